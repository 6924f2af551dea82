"""Signalling an agent's process tree: its leader, its process group, and escaped descendants."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import structlog

log = structlog.get_logger(__name__)

# How long kill_stragglers waits for SIGKILLed descendants (outside the group) to disappear.
_DESCENDANT_WAIT = 1.0


def signal_tree(
    leader_pidfd: int | None, pgid: int, sig: signal.Signals, family: list[psutil.Process]
) -> None:
    """Signal the leader's group (the leader with it) and the descendants that left the group,
    each process once: an agent's SDK takes a second SIGTERM as "stop now".

    leader_pidfd is None once the leader is gone: its pidfd is closed and its group swept, so
    only the descendants are left to signal. While it is open the group id is the leader's own
    (a session leader cannot leave its group, and we have not reaped it), so killpg cannot
    reach a stranger's group.
    """
    if leader_pidfd is not None:
        signal_group(pgid, sig)
        signal_escaped(pgid, sig, family)
        return
    for proc in family:
        _signal(proc, sig)


def signal_escaped(pgid: int, sig: signal.Signals, family: list[psutil.Process]) -> None:
    """After the group itself was signalled: the members of the family that left it (each
    process once: a member still in the group has the signal already)."""
    for proc in family:
        if _group_of(proc.pid) != pgid:
            _signal(proc, sig)


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)  # psutil checks the PID still names the same process
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied as exc:
        log.warning("cannot signal descendant", pid=proc.pid, signal=sig.name, error=str(exc))


def kill_group(pgid: int) -> None:
    signal_group(pgid, signal.SIGKILL)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # nothing left in the group
    except PermissionError as exc:
        log.warning("cannot signal process group", pgid=pgid, signal=sig.name, error=str(exc))


async def kill_stragglers(agent_id: str, family: list[psutil.Process], group: int) -> None:
    """SIGKILL descendants that outlived the leader (they left its group), and let them go."""
    survivors = [proc for proc in family if _alive(proc)]
    if not survivors:
        return
    # Members of the agent's own group were swept with SIGKILL when the leader went and are
    # merely still exiting: only those that left the group are worth a warning.
    escaped = [proc.pid for proc in survivors if _group_of(proc.pid) != group]
    if escaped:
        log.warning("killing descendants that outlived the agent", agent_id=agent_id, pids=escaped)
    for proc in survivors:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied as exc:
            log.warning("cannot kill descendant", agent_id=agent_id, pid=proc.pid, error=str(exc))
    # A short poll: they are not ours to reap, and SIGKILL takes effect within milliseconds.
    deadline = asyncio.get_running_loop().time() + _DESCENDANT_WAIT
    while any(_alive(proc) for proc in survivors):
        if asyncio.get_running_loop().time() >= deadline:
            log.error("descendants still alive after SIGKILL", agent_id=agent_id)
            return
        await asyncio.sleep(0.01)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
