"""One agent unit as the systemd runtime watches it: its state merged from signals, and its exit.

systemd tells a unit's changes in PropertiesChanged signals, the Service interface's
(MainPID, ExecMainCode, ExecMainStatus, Result) apart from the Unit interface's (ActiveState,
SubState), always in that order for one change ("clients may rely on this order", bus-unit.c),
and it repeats unchanged values freely. UnitWatch merges them into the unit's state and says
when the unit has started, runs, and has ended — once: `ended` only ever turns true, and the
runtime reports the exit the first time it does.

A unit is new to systemd when it is created, and the first signals about it say `inactive`
before it starts: those are not an end. An end is `inactive` or `failed` once it was seen
starting, or with an exit status already (signals coalesced: a program that ended at once), or
the unit's removal after it started (a signal missed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from opmasd.core.model import ExitInfo, ProcessHandle
from opmasd.runtime.systemd_cgroup import OomWatch, UnitUsage
from opmasd.runtime.systemd_units import ChangeKind, UnitChange

# ExecMainCode: how the main process ended, as waitid(2) says (0: it has not).
CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3
OOM_CAUSE = "out of memory (MemoryMax)"
LIVE_STATES = frozenset({"activating", "active", "reloading", "deactivating"})
END_STATES = frozenset({"inactive", "failed"})

# systemd's own exit statuses for a service process that failed before or at exec
# (systemd's exit-status.h): what each says went wrong.
SYSTEMD_STATUSES = {
    200: "CHDIR: cannot change to the working directory",
    201: "NICE",
    202: "FDS",
    203: "EXEC: the program could not be executed",
    204: "MEMORY",
    205: "LIMITS: a resource limit could not be set",
    206: "OOM_ADJUST",
    207: "SIGNAL_MASK",
    208: "STDIN",
    209: "STDOUT: the journal could not be connected",
    210: "CHROOT",
    214: "SETSCHEDULER",
    216: "GROUP: the group could not be set",
    217: "USER: the user could not be set",
    218: "CAPABILITIES",
    219: "CGROUP: the unit's cgroup could not be joined",
    226: "NAMESPACE",
    243: "CREDENTIALS",
}


def exit_info(code: int, status: int, result: str, oom: bool, when: datetime) -> ExitInfo:
    """How the unit's main process ended, from ExecMainCode and ExecMainStatus; `oom` (or
    Result=oom-kill, which systemd sets on cgroup v2) adds the cause."""
    cause = OOM_CAUSE if oom or result == "oom-kill" else ""
    if code == CLD_EXITED:
        return ExitInfo(exit_code=status, signal=None, time=when, cause=cause)
    if code in (CLD_KILLED, CLD_DUMPED):
        return ExitInfo(exit_code=None, signal=status, time=when, cause=cause)
    return ExitInfo(
        exit_code=None, signal=None, time=when, cause=cause or f"systemd gave no status ({result})"
    )


def start_failure(code: int, status: int, result: str, job_result: str | None) -> str:
    """Why a unit did not start, in systemd's terms."""
    if code == CLD_EXITED and status in SYSTEMD_STATUSES:
        return f"systemd could not start it: status {status}/{SYSTEMD_STATUSES[status]}"
    if code == CLD_EXITED:
        return f"it exited at once with code {status}"
    if code in (CLD_KILLED, CLD_DUMPED):
        return f"it was killed at once by signal {status}"
    job = f", start job {job_result}" if job_result else ""
    return f"systemd could not start it (result {result or 'unknown'}{job})"


class Outcome(Enum):
    """How a launch ended its wait."""

    RUNNING = "running"
    ENDED = "ended"  # ended before it was seen running
    JOB_FAILED = "job-failed"  # the start job failed (the unit's end may follow)


@dataclass(eq=False)
class UnitWatch:
    """One unit watched for an agent (see the module doc)."""

    agent_id: str
    unit: str
    active_state: str = ""
    sub_state: str = ""
    main_pid: int = 0
    exec_main_code: int = 0
    exec_main_status: int = 0
    result: str = ""
    job_result: str | None = None
    started: bool = False
    running: bool = False
    ended: bool = False
    # The process reported to the manager (by launch or adopt); None until then.
    handle: ProcessHandle | None = None
    # Set while launch() has not returned: an end seen meanwhile waits for it.
    launching: asyncio.Future[Outcome] | None = None
    exit_pending: bool = False
    finishing: bool = False  # its exit is being reported
    # Stopped by reap_unmanaged: its end goes to no exit handler.
    reaped: bool = False
    exit: ExitInfo | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    # Set at every signal merged (a waiter clears it, then checks what it waits for).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    oom: OomWatch | None = None
    usage: UnitUsage | None = None

    def apply(self, change: UnitChange) -> None:
        """Merge one signal; afterwards `running` and `ended` say where the unit is."""
        if change.kind is ChangeKind.JOB_REMOVED:
            self.job_result = change.job_result
        for name in ("active_state", "sub_state", "main_pid", "exec_main_code", "exec_main_status", "result"):
            value = getattr(change, name)
            if value is not None:
                setattr(self, name, value)
        if self.active_state in LIVE_STATES and change.active_state is not None:
            self.started = True
        if self.started and (self.active_state, self.sub_state) == ("active", "running") and self.main_pid:
            self.running = True
        if change.active_state in END_STATES and (self.started or self.exec_main_code):
            self.ended = True
        if change.kind is ChangeKind.UNIT_REMOVED and self.started:
            self.ended = True
        self.changed.set()

    async def until_ended(self, seconds: float) -> bool:
        """Wait (bounded) for the unit's end; whether it came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.ended:
            self.changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return self.ended
        return True

    def outcome(self) -> Outcome | None:
        """What a launch waiting on this unit learns now; None: nothing yet."""
        if self.ended and not self.running:
            return Outcome.ENDED
        if self.running:
            return Outcome.RUNNING
        if self.job_result is not None and self.job_result != "done":
            return Outcome.JOB_FAILED
        return None

    def exit_info(self, oom: bool, when: datetime) -> ExitInfo:
        return exit_info(self.exec_main_code, self.exec_main_status, self.result, oom, when)

    def close(self) -> None:
        if self.oom is not None:
            self.oom.close()
            self.oom = None
