"""One agent process as the process runtime watches it, and how it is identified and reaped.

An agent's leader is watched through a pidfd (runtime.process). Its identity is its PID and its
start time since boot (runtime.procstat), checked again whenever a daemon adopts it; its exit
status can be read only by its real parent, so an adopted process ends "status unknown".
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from dataclasses import dataclass, field

import psutil
import structlog

from opmasd.core.model import LEGACY_START_TIME_FLOOR, ExitInfo, ProcessHandle
from opmasd.runtime import procstat, signals
from opmasd.runtime.usage import UsageSampler

log = structlog.get_logger(__name__)

# Rows of older versions hold psutil's create_time (boot time + start ticks): equal within this.
_LEGACY_START_TIME_TOLERANCE = 0.01


@dataclass(eq=False)
class WatchedProcess:
    """One agent process being watched through its pidfd."""

    agent_id: str
    handle: ProcessHandle
    pidfd: int
    # Our child: kept referenced until reaped, or subprocess' _cleanup could reap it behind our
    # back. None for an adopted process, whose exit status only its real parent can read.
    popen: subprocess.Popen[bytes] | None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    exit: ExitInfo | None = None
    # Set by a stop: until then (loop time) the rest of the tree may finish its own teardown
    # after the leader went, before it is killed.
    grace_until: float | None = None
    # The leader has ended and its pidfd is closed; the rest of the tree may live on a moment.
    leader_gone: bool = False
    # The group has had its SIGTERM already (ProcessRuntime.begin_terminate).
    term_sent: bool = False
    # Lives as long as the watch: a new process of the same agent starts with a fresh sampler.
    usage: UsageSampler = field(init=False)

    def __post_init__(self) -> None:
        self.usage = UsageSampler(self.agent_id, self.handle.pid)

    def signal_group(self, sig: signal.Signals) -> bool:
        """Signal the leader's process group while the leader is ours and alive (its group id
        cannot name a stranger's group then); whether it was signalled."""
        if self.leader_gone or self.gone.is_set():
            return False
        signals.signal_group(self.handle.pid, sig)
        return True

    def signal_tree(self, sig: signal.Signals, family: list[psutil.Process]) -> None:
        # Once the leader is gone its pidfd is closed (and, without cgroups, its group swept):
        # its group ID may be free for reuse, so only the descendants are signalled.
        gone = self.leader_gone or self.gone.is_set()
        signals.signal_tree(None if gone else self.pidfd, self.handle.pid, sig, family)


def start_time_of(pid: int, agent_id: str) -> float:
    stat = procstat.read(pid)
    if stat is None:  # our unreaped child is always readable; keep going regardless
        log.error("cannot read process start time", agent_id=agent_id, pid=pid)
        return 0.0
    return stat.start_time


def same_process(handle: ProcessHandle, stat: procstat.ProcStat) -> bool:
    """Whether the process read now is the one `handle` recorded (its PID may have been reused)."""
    if handle.start_time < LEGACY_START_TIME_FLOOR:
        return procstat.same_start(handle.start_time, stat.start_time)
    # Recorded by an older version as wall-clock create_time: compared the way it was then.
    try:
        created = psutil.Process(handle.pid).create_time()
    except psutil.Error:
        return False
    return abs(created - handle.start_time) <= _LEGACY_START_TIME_TOLERANCE


def reap(watched: WatchedProcess) -> ExitInfo:
    """How the leader ended: its status for our own child, unknown for an adopted one."""
    if watched.popen is None:
        return ExitInfo(exit_code=None, signal=None)
    returncode = watched.popen.poll()
    if returncode is None:  # cannot happen once the pidfd is readable; never hang on it
        log.error(
            "pidfd readable but process not reaped; waiting",
            agent_id=watched.agent_id,
            pid=watched.handle.pid,
        )
        returncode = watched.popen.wait()
    if returncode >= 0:
        return ExitInfo(exit_code=returncode, signal=None)
    return ExitInfo(exit_code=None, signal=-returncode)
