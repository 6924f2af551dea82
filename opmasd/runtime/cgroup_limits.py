"""Resource limits of the process runtime, enforced by the agent's cgroup (v2) or refused.

An agent's `memory_max_bytes`, `cpu_quota_percent` and `tasks_max` are the kernel's memory,
cpu and pids controllers' to enforce: memory.max, cpu.max and pids.max in the agent's cgroup,
written before its process joins it. rlimits are no substitute (RLIMIT_AS counts address space,
not memory; RLIMIT_NPROC counts a whole user's processes; RLIMIT_CPU total seconds, not a
share), so where the controllers are not there for opmasd — no agent cgroups at all, or a
hierarchy whose controllers are elsewhere (cgroup v1, or not delegated) — these limits are
refused, naming the field and why, instead of being stored and ignored. The open-files limit
is an rlimit per process (runtime.process applies it) and is always enforced.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from opmasd.core.model import ResourceLimits

log = structlog.get_logger(__name__)

# The spec's field for each controller that enforces it.
FIELDS = {
    "memory": "resources.memory_max_bytes",
    "cpu": "resources.cpu_quota_percent",
    "pids": "resources.tasks_max",
}
CPU_PERIOD_USEC = 100_000


def wanted(resources: ResourceLimits) -> list[str]:
    """The controllers the limits need, in FIELDS' order."""
    need = {
        "memory": resources.memory_max_bytes > 0,
        "cpu": resources.cpu_quota_percent > 0,
        "pids": resources.tasks_max > 0,
    }
    return [controller for controller in FIELDS if need[controller]]


class CgroupLimits:
    """Which controllers agent cgroups under `base` have (enabled for them once, at start)."""

    def __init__(self, base: Path | None, why_none: str = "") -> None:
        """base: the directory the agent cgroups are made in (None: there are none; why_none
        says why, for the refusals)."""
        self.available: frozenset[str] = frozenset()
        # Why each controller that is not available is not.
        self._why_not: dict[str, str] = dict.fromkeys(
            FIELDS, why_none or "opmasd has no cgroups for its agents"
        )
        if base is not None:
            self.available, self._why_not = _enable(base)

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        """(field, why) for each limit that cannot be enforced here; [] when all can."""
        return [
            (
                FIELDS[controller],
                f"the process runtime cannot enforce it on this host: {self._why_not[controller]}; "
                "use runtime: systemd, or leave it unset",
            )
            for controller in wanted(resources)
            if controller not in self.available
        ]

    def apply(self, cgroup: Path, resources: ResourceLimits) -> None:
        """Write the limits into the agent's cgroup (before its process joins). OSError when one
        cannot be written: the agent must not run without a limit it was given."""
        values = {
            "memory": ("memory.max", str(resources.memory_max_bytes)),
            "cpu": (
                "cpu.max",
                f"{int(resources.cpu_quota_percent * CPU_PERIOD_USEC / 100)} {CPU_PERIOD_USEC}",
            ),
            "pids": ("pids.max", str(resources.tasks_max)),
        }
        for controller in FIELDS:
            name, value = values[controller]
            # A limit not asked for goes back to none: the cgroup may be one an earlier run of
            # the agent, with other limits, left behind.
            text = value if controller in wanted(resources) else "max"
            if controller == "cpu" and text == "max":
                text = f"max {CPU_PERIOD_USEC}"
            if controller not in self.available:
                continue
            with open(cgroup / name, "w", encoding="ascii") as file:
                file.write(text)


def _enable(base: Path) -> tuple[frozenset[str], dict[str, str]]:
    """Turn on the controllers for the cgroups below base; which are on, and why not the rest."""
    try:
        with open(base / "cgroup.controllers", encoding="ascii") as file:
            offered = set(file.read(4096).split())
    except OSError as exc:
        return frozenset(), dict.fromkeys(FIELDS, f"cannot read {base}/cgroup.controllers: {exc.strerror}")
    for controller in FIELDS:
        if controller not in offered:
            continue
        try:
            with open(base / "cgroup.subtree_control", "w", encoding="ascii") as file:
                file.write(f"+{controller}")
        except OSError as exc:
            log.warning("cannot enable a cgroup controller for agents", controller=controller, error=str(exc))
    try:
        with open(base / "cgroup.subtree_control", encoding="ascii") as file:
            enabled = frozenset(file.read(4096).split()) & frozenset(FIELDS)
    except OSError as exc:
        return frozenset(), dict.fromkeys(
            FIELDS, f"cannot read {base}/cgroup.subtree_control: {exc.strerror}"
        )
    why_not = {
        controller: (
            f"the {controller} controller is not available to opmasd's cgroup {base} (cgroup v1 "
            "holds it, or it is not delegated)"
            if controller not in offered
            else f"cannot enable the {controller} controller in {base}"
        )
        for controller in FIELDS
        if controller not in enabled
    }
    return enabled, why_not
