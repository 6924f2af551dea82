"""The agent-id grammar: what an agent id may be, and the id a name gives when none is chosen.

An id is one token of NATS subjects such as `agent.{id}.command`, a file name (its log), and a
systemd unit name part, so it is kept to 1-63 of [a-z0-9_-], starting with a letter or digit:
no dots, no wildcards, no upper case. Some ids are the first token of the manager's own
subjects (`agent.manager.command`, `agent.status`, ...) and are reserved.
"""

from __future__ import annotations

import re

from opmasd.core.errors import InvalidArgument

MAX_AGENT_ID_LENGTH = 63
AGENT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# First tokens after the subject prefix that name the manager's own subjects.
RESERVED_AGENT_IDS = frozenset({"manager", "status", "metrics", "node", "events"})


def is_valid_agent_id(agent_id: str) -> bool:
    return bool(AGENT_ID_PATTERN.match(agent_id)) and agent_id not in RESERVED_AGENT_IDS


def check_agent_id(agent_id: str, field: str = "agent_id") -> None:
    """Raise InvalidArgument, naming `field`, unless agent_id follows the grammar."""
    if not agent_id:
        raise InvalidArgument.single(field, "must not be empty")
    if not AGENT_ID_PATTERN.match(agent_id):
        raise InvalidArgument.single(
            field,
            f"{agent_id[:80]!r} is not a valid agent id: use 1-63 characters of a-z, 0-9, '-', '_', "
            "starting with a letter or digit",
        )
    if agent_id in RESERVED_AGENT_IDS:
        raise InvalidArgument.single(field, f"{agent_id!r} is reserved for opmasd's own NATS subjects")


def agent_id_from_name(name: str) -> str:
    """The id an agent gets when none is given: its name, lower-cased, other characters as '-'."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-_")
    # Cut to the length allowed, then again of what the cut may leave at its end ("long-name-").
    return slug[:MAX_AGENT_ID_LENGTH].rstrip("-_")
