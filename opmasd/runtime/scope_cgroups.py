"""The cgroups of process-runtime agents in systemd scopes, and the gate their launch waits at.

With agents.process_scopes (runtime.process_scopes) each agent runs in a transient scope
`opmas-proc-<escaped id>.scope`, in the slice of opmasd's own unit. The scope's cgroup on the
cgroup2 hierarchy is the agent's tree exactly as an agent cgroup is without scopes
(runtime.cgroups): ScopeCgroups gives CgroupTrees the same interface over those directories,
except that systemd, not opmasd, creates and removes them.

The gate: the agent is spawned as a shell that waits for one line ("go") on its stdin, a pipe
whose write end only opmasd holds, before it execs the program. opmasd writes it once the scope
holds the shell; a daemon that dies first closes the pipe, and the shell exits 126 instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from opmasd.core.model import ResourceLimits
from opmasd.runtime.cgroup_limits import FIELDS, CgroupLimits, wanted
from opmasd.runtime.cgroups import AgentCgroups
from opmasd.runtime.systemd_launch import quota_refusals
from opmasd.runtime.systemd_units import systemd_escape, systemd_unescape

log = structlog.get_logger(__name__)

SCOPE_PREFIX = "opmas-proc-"
RELAY_SCOPE_PREFIX = "opmas-logrelay-"
_SUFFIX = ".scope"
_NAME_MAX = 255  # systemd's UNIT_NAME_MAX
# Reads the gate's line, then execs the program with /dev/null as its stdin instead of the pipe.
_WAIT_SCRIPT = 'IFS= read -r go && [ "$go" = go ] || exit 126; exec "$@" </dev/null'


def scope_name(agent_id: str) -> str:
    """`opmas-proc-<id escaped as systemd-escape does>.scope`; ValueError when too long."""
    name = f"{SCOPE_PREFIX}{systemd_escape(agent_id)}{_SUFFIX}"
    if not agent_id or len(name) > _NAME_MAX:
        raise ValueError(f"agent id {agent_id!r} makes no valid scope name")
    return name


def relay_scope_name(pid: int) -> str:
    """A log relay's scope, named by its PID: a new relay never meets an old one's scope."""
    return f"{RELAY_SCOPE_PREFIX}{pid}{_SUFFIX}"


def waiting_command(command: tuple[str, ...]) -> tuple[str, ...]:
    """`command`, started only once a line "go" arrives on stdin (see Gate)."""
    return ("/bin/sh", "-c", _WAIT_SCRIPT, "opmas-scope-wait", *command)


@dataclass
class Gate:
    """The pipe a waiting launch reads its go-ahead from: `read` is the child's stdin."""

    read: int
    write: int
    # The scope's limits, as StartTransientUnit properties (scope_limits).
    limits: tuple[tuple[str, str, Any], ...] = ()

    @classmethod
    def open(cls, limits: tuple[tuple[str, str, Any], ...] = ()) -> Gate:
        read, write = os.pipe2(os.O_CLOEXEC)
        return cls(read, write, limits)

    def go(self) -> None:
        """Let the child exec its program (3 bytes into an empty pipe: never blocks)."""
        os.write(self.write, b"go\n")

    def close(self) -> None:
        """Idempotent. Closing without go() ends the waiting child (exit 126)."""
        for fd in (self.read, self.write):
            if fd >= 0:
                os.close(fd)
        self.read = self.write = -1


class ScopeLimits(CgroupLimits):
    """The process runtime's limits as its scopes' properties, where systemd has the controller
    (on cgroup v1 too: systemd applies MemoryMax there as memory.limit_in_bytes)."""

    def __init__(self, controllers: frozenset[str]) -> None:
        super().__init__(None)
        self.available = controllers & frozenset(FIELDS)
        self._why_not = {
            controller: f"systemd has no {controller} controller here for opmasd's scopes"
            for controller in FIELDS
            if controller not in self.available
        }

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        """As CgroupLimits', and a CPU quota under what systemd can enforce (it would be 0.1%)."""
        return super().refusals(resources) + quota_refusals(resources)

    def properties(self, resources: ResourceLimits) -> tuple[tuple[str, str, Any], ...]:
        """The scope's properties for the limits asked for (refusals() said they can be)."""
        values = {
            "memory": ("MemoryMax", "t", resources.memory_max_bytes),
            # One whole CPU is 1 000 000 µs per second: 1 % is 10 000.
            "cpu": ("CPUQuotaPerSecUSec", "t", int(resources.cpu_quota_percent * 10_000)),
            "pids": ("TasksMax", "t", resources.tasks_max),
        }
        return tuple(values[controller] for controller in wanted(resources) if controller in self.available)


def scope_controllers(cgroup2: Path) -> frozenset[str]:
    """The controllers of the limits (memory, cpu, pids) that systemd has here: on the cgroup2
    hierarchy mounted at `cgroup2`, or as cgroup v1 hierarchies this process is in."""
    found: set[str] = set()
    try:
        with open(cgroup2 / "cgroup.controllers", "rb") as file:
            found.update(os.fsdecode(name) for name in file.read(4096).split())
    except OSError as exc:
        log.warning("cannot read the cgroup2 controllers", path=str(cgroup2), error=str(exc))
    try:
        with open("/proc/self/cgroup", "rb") as file:
            lines = file.read(1 << 16).splitlines()
    except OSError as exc:
        log.warning("cannot read /proc/self/cgroup", error=str(exc))
        lines = []
    for line in lines:  # "N:controller,controller:path" for each v1 hierarchy
        parts = line.split(b":", 2)
        if len(parts) == 3 and parts[1]:
            found.update(os.fsdecode(name) for name in parts[1].split(b","))
    return frozenset(found) & frozenset(FIELDS)


class ScopeCgroups(AgentCgroups):
    """The agents' scope cgroups under `base`, the cgroup2 directory of opmasd's slice."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        # Agents whose scope is being made: not unmanaged, though nothing watches them yet.
        self.placing: set[str] = set()

    def path(self, agent_id: str) -> Path:
        return self.base / scope_name(agent_id)

    def prepare(self, agent_id: str) -> Path:
        """Scopes are systemd's to create (runtime.process_scopes): only their procs file."""
        return self.path(agent_id) / "cgroup.procs"

    def agents(self) -> list[str]:
        """The agents with a scope under base, but those whose scope is being made."""
        try:
            names = os.listdir(self.base)
        except OSError as exc:
            log.warning("cannot list agent scopes", base=str(self.base), error=str(exc))
            return []
        found = []
        for name in names:
            if not (name.startswith(SCOPE_PREFIX) and name.endswith(_SUFFIX)):
                continue
            try:
                agent_id = systemd_unescape(name[len(SCOPE_PREFIX) : -len(_SUFFIX)])
            except ValueError as exc:
                log.warning("a scope name that is no agent's", scope=name, error=str(exc))
                continue
            if agent_id not in self.placing:
                found.append(agent_id)
        return sorted(found)

    def remove(self, agent_id: str) -> None:
        """Nothing to do: systemd removes a scope's cgroup when the scope ends (it is empty)."""

    def close(self) -> None:
        """Nothing to do: the slice is systemd's."""
