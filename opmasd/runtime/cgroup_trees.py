"""Agent process trees kept whole by their cgroups: find the leader, kill what is left, sweep.

The process runtime's cgroup side (runtime.cgroups has the kernel interface): after a leader
ends, what it left behind in its cgroup is killed and named (PID and command) before the exit
is reported, so `stopped` means the whole tree is gone; a restarted daemon finds the leader of
a launch it never recorded; and cgroups no agent claims are emptied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Container, Iterable

import psutil
import structlog

from opmasd.runtime import procstat
from opmasd.runtime.cgroups import AgentCgroups

log = structlog.get_logger(__name__)

# How long SIGKILLed members of an agent's cgroup may take to be gone before that is an error.
EMPTY_WAIT = 2.0
_POLL = 0.005


class CgroupTrees:
    def __init__(self, cgroups: AgentCgroups) -> None:
        self.cgroups = cgroups

    def family(self, agent_id: str, leader: int) -> list[psutil.Process]:
        """Every member of the agent's cgroup but its leader."""
        return _processes(pid for pid in self.cgroups.members(agent_id) if pid != leader)

    def leader(self, agent_id: str) -> procstat.ProcStat | None:
        """The agent's leader among its cgroup's members: the oldest session leader (the
        process the daemon spawned is the first member, in a session of its own)."""
        stats = [stat for pid in self.cgroups.members(agent_id) if (stat := procstat.read(pid)) is not None]
        alive = [stat for stat in stats if not stat.zombie]
        leaders = [stat for stat in alive if stat.pid == stat.sid] or alive
        return min(leaders, key=lambda stat: (stat.start_time, stat.pid), default=None)

    def kill_orphans(self, agent_id: str) -> tuple[str, ...]:
        """Kill what is in the cgroup of an agent whose leader is gone; "PID command" of each."""
        pids = self.cgroups.members(agent_id)
        if not pids:
            return ()
        described = describe(pids)
        log.warning("killing processes an agent left behind", agent_id=agent_id, processes=list(described))
        self.cgroups.kill(agent_id)
        return described

    async def clear_after_exit(self, agent_id: str, grace_until: float | None) -> tuple[str, ...]:
        """The leader has ended: give a stopping tree until grace_until (loop time) to finish
        its own teardown, kill what is left, wait until the cgroup is empty and remove it.
        Returns what had to be killed."""
        loop = asyncio.get_running_loop()
        if grace_until is not None:
            while self.cgroups.populated(agent_id) and loop.time() < grace_until:
                await asyncio.sleep(0.01)
        killed = self.kill_orphans(agent_id)
        if killed:
            await self.emptied(agent_id)
        self.cgroups.remove(agent_id)
        return killed

    async def emptied(self, agent_id: str) -> None:
        """Wait (bounded) for SIGKILLed members to be gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EMPTY_WAIT
        while self.cgroups.populated(agent_id):
            if loop.time() >= deadline:
                log.error(
                    "agent cgroup still has processes after SIGKILL",
                    agent_id=agent_id,
                    pids=self.cgroups.members(agent_id),
                )
                return
            await asyncio.sleep(_POLL)

    async def reap_unmanaged(self, watched: Container[str]) -> list[str]:
        """Empty and remove the cgroups of agents not watched; one line per agent affected."""
        reports: list[str] = []
        for agent_id in self.cgroups.agents():
            if agent_id in watched:
                continue
            killed = self.kill_orphans(agent_id)
            if killed:
                reports.append(
                    f"agent {agent_id}: killed {len(killed)} unmanaged process(es): {', '.join(killed)}"
                )
                await self.emptied(agent_id)
            self.cgroups.remove(agent_id)
        return reports


def describe(pids: Iterable[int]) -> tuple[str, ...]:
    """ "PID command" for each process, for logs and the exit reason."""
    return tuple(f"{pid} {procstat.command_line(pid, 80)}".rstrip() for pid in sorted(pids))


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found
