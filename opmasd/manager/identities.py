"""Who an agent may run as (its spec's user and group): known on this host, and only another
than opmasd's own where opmasd is root, else refused at registration, naming the field."""

from __future__ import annotations

import os
import re

from opmasd.core.accounts import gid_of, uid_of
from opmasd.core.model import AgentSpec

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|0|[1-9][0-9]{0,9}")


def identity_refusals(spec: AgentSpec, euid: int | None = None) -> list[tuple[str, str]]:
    """(field, why) for a user or group the agent cannot run as."""
    me = os.geteuid() if euid is None else euid
    refused: list[tuple[str, str]] = []
    for field, value in (("user", spec.user), ("group", spec.group)):
        if not value:
            continue
        if not _NAME.fullmatch(value):
            refused.append((field, f"{value[:40]!r} is not a {field} name or number"))
            continue
        found = uid_of(value) if field == "user" else gid_of(value)
        if found is None:
            refused.append((field, f"no {field} {value!r} on this host"))
        elif me != 0 and (found != me if field == "user" else found != os.getegid()):
            refused.append(
                (field, f"opmasd runs as uid {me}, not root: it cannot start an agent as another {field}")
            )
    return refused
