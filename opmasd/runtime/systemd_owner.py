"""Which opmasd an agent unit belongs to: an instance identity, marked in the unit's Description.

Two opmasd (two state directories, two databases) may talk to one systemd; both name their
units `opmas-agent-<id>.service`. Each marks its units with its instance id, in the unit's
Description (`OPMAS agent <id> (opmasd <instance>)`): ListUnitsByPatterns returns it with every
unit, GetAll reads it back, and `systemctl status` shows it. At adoption and on the unclaimed
units' sweep, a unit marked by another instance is left alone; launching an agent whose unit
name another instance's unit holds fails, naming the unit and that owner.

The instance id is a random 128-bit id written at first start into the state directory
(`instance-id`, 0600). The state directory, not the database: it is what makes an opmasd one
(the instance lock lives there, so two running daemons never share it), it needs no schema
change, and it is there before the store is opened. A unit without a mark (made before marks
existed) counts as this opmasd's own: that is the upgrade path, the behaviour of before.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

import structlog

from opmasd.runtime.systemd_units import UnitState

log = structlog.get_logger(__name__)

INSTANCE_FILE = "instance-id"
_INSTANCE = re.compile(r"[0-9a-f]{32}")
_MARK = re.compile(r" \(opmasd ([0-9a-f]{32})\)$")


def describe(agent_id: str, instance: str) -> str:
    """The Description of the agent's unit, marked with the instance ("" leaves it unmarked)."""
    text = f"OPMAS agent {agent_id}"
    return f"{text} (opmasd {instance})" if instance else text


def owner_of(description: str) -> str | None:
    """The instance that marked a unit's Description; None for an unmarked one."""
    match = _MARK.search(description)
    return match.group(1) if match else None


def is_foreign(description: str, instance: str) -> bool:
    """Whether the unit belongs to another opmasd (an unmarked one is ours)."""
    owner = owner_of(description)
    return owner is not None and bool(instance) and owner != instance


def split_owned(states: Sequence[UnitState], instance: str) -> tuple[dict[str, UnitState], dict[str, str]]:
    """The units found running: this instance's (unmarked ones included) by name, and the
    others' (unit -> owner), each logged once, here, as left alone."""
    own: dict[str, UnitState] = {}
    foreign: dict[str, str] = {}
    for state in states:
        if is_foreign(state.description, instance):
            foreign[state.name] = owner_of(state.description) or ""
            log.warning(
                "leaving alone an agent unit of another opmasd", unit=state.name, owner=foreign[state.name]
            )
        else:
            own[state.name] = state
    return own, foreign


def load_instance_id(state_dir: Path) -> str:
    """This opmasd's instance id, created at first start. OSError when it cannot be read or
    written, ValueError when the file holds something else."""
    path = state_dir / INSTANCE_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = secrets.token_hex(16)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another start wrote it meanwhile
            return load_instance_id(state_dir)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(text + "\n")
        return text
    if not _INSTANCE.fullmatch(text):
        raise ValueError(f"{path} does not hold an instance id (32 hex digits)")
    return text
