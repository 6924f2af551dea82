"""What a launch of the systemd runtime puts together: the agent's unit, the checks before it
(the program can run, the unit's name is free), and why it failed when it did.

The unit runs the agent's program under systemd-cat, which connects its stdout and its stderr
to two journal streams (stdout at priority info, stderr at warning, `<N>` prefixes not parsed,
so an agent's output is never taken for a level) and then execs it: the unit's MainPID is the
agent. Since systemd-cat execs the program itself, systemd sees it start in any case and a
program that cannot run is only systemd-cat's exit status 1; check_program finds that first,
where systemd-cat will look (the same filesystem, seen through the runtime's root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from opmasd.core.errors import BackendError, LaunchError
from opmasd.core.logs import LogEntry, LogStream
from opmasd.core.model import ResourceLimits
from opmasd.runtime import procstat
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.programs import not_executable, not_found
from opmasd.runtime.systemd_dbus import BUS_NO_REPLY, NO_SUCH_UNIT, SystemdError, SystemdManager
from opmasd.runtime.systemd_env import EnvironmentFiles
from opmasd.runtime.systemd_journal import UnitJournal
from opmasd.runtime.systemd_owner import describe, is_foreign, owner_of
from opmasd.runtime.systemd_sandboxing import sandbox_properties
from opmasd.runtime.systemd_units import ChangeKind, TransientUnit, UnitChange, escape_unit_name
from opmasd.runtime.systemd_watch import END_STATES, Outcome, UnitWatch, start_failure

log = structlog.get_logger(__name__)

SYSTEMD_CAT = "/usr/bin/systemd-cat"
# PATH of a service without one in its environment (systemd's DEFAULT_PATH).
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A running unit's stop timeout cannot be changed: terminate() keeps its own and SIGKILLs after
# it. This one (systemd's DefaultTimeoutStopSec) is for stops that are not opmasd's (systemctl).
DEFAULT_STOP_USEC = 90_000_000
_FAILURE_LINES = 5  # the journal lines quoted when a unit fails to start
_REMOVAL_WAIT = 2.0  # for a stale unit to be unloaded before its name is reused


# systemd turns a CPU quota into the kernel's CFS quota, never below 1 ms (the kernel's minimum)
# per period, stretching the period from 100 ms up to 1 s for it (measured on 252): anything
# under 0.1% of a CPU would be enforced as 0.1%.
MIN_CPU_QUOTA_PERCENT = 0.1


def quota_refusals(resources: ResourceLimits) -> list[tuple[str, str]]:
    quota = resources.cpu_quota_percent
    if 0 < quota < MIN_CPU_QUOTA_PERCENT:
        why = (f"{quota:g}% is below what systemd can enforce ({MIN_CPU_QUOTA_PERCENT:g}% of a CPU: "
               "the kernel's minimum quota of 1 ms in systemd's longest period, 1 s)")  # fmt: skip
        return [("resources.cpu_quota_percent", why)]
    return []


def unit_refusals(agent_id: str, foreign: Mapping[str, str]) -> list[tuple[str, str]]:
    """(field, why) when the agent cannot have a unit: its id makes too long a unit name, or
    another opmasd's unit (foreign: unit -> owner) holds the name."""
    try:
        unit = escape_unit_name(agent_id)
    except ValueError as exc:
        return [("id", f"cannot run under the systemd runtime: {exc}")]
    if (owner := foreign.get(unit)) is not None:
        return [("id", f"unit {unit} belongs to another opmasd on this systemd (instance {owner})")]
    return []


def agent_unit(
    request: LaunchRequest, instance: str = "", env_file: str = "", hidden: tuple[str, ...] = ()
) -> TransientUnit:
    """The agent's transient unit (runtime.systemd's module doc says why each property): marked
    with the instance, its environment in env_file (runtime.systemd_env; "": as Environment=),
    and `hidden` inaccessible to it: opmasd's state, runtime and log directories and its
    configuration hold every agent's secrets, which an agent running as root (the default)
    could otherwise read, capabilities or not ("-": a path that is not there is no error)."""
    unit = escape_unit_name(request.agent_id)
    res = request.resources
    cat = (SYSTEMD_CAT, f"--identifier={unit}", "--stderr-priority=warning", "--level-prefix=false", "--")
    return TransientUnit(
        exec_start=(*cat, *request.command),
        description=describe(request.agent_id, instance),
        environment={} if env_file else request.environment,
        environment_files=(env_file,) if env_file else (),
        working_directory=request.working_directory or None,
        user=request.user or None,
        group=request.group or None,
        memory_max=res.memory_max_bytes or None,
        cpu_quota_per_sec_usec=int(res.cpu_quota_percent * 10_000) or None,
        tasks_max=res.tasks_max or None,
        limit_nofile=res.open_files_max or None,
        timeout_stop_usec=DEFAULT_STOP_USEC,
        restart="no",
        kill_mode="control-group",
        collect_mode="inactive-or-failed",
        syslog_identifier=unit,
        extra=(
            ("SendSIGKILL", "b", True),
            ("StartLimitIntervalUSec", "t", 0),
            *sandbox_properties(request),
            *((("InaccessiblePaths", "as", [f"-{path}" for path in hidden]),) if hidden else ()),
        ),
    )


def check_program(root: Path, request: LaunchRequest) -> None:
    """LaunchError when the program cannot be found or executed where systemd-cat will look:
    relative to the working directory, or along the unit's PATH (a service's default without one)."""
    program = request.command[0]
    cwd = request.working_directory or "/"
    if "/" in program:
        candidates = [os.path.join(cwd, program)]
    else:
        path = request.environment.get("PATH", SERVICE_PATH)
        candidates = [os.path.join(d or cwd, program) for d in path.split(":")]
    for candidate in candidates:
        seen = root / candidate.lstrip("/")
        if seen.exists():
            if seen.is_dir() or not os.access(seen, os.X_OK):
                raise LaunchError(not_executable(program))
            return
    raise LaunchError(not_found(program))


def read_stat(root: Path, pid: int) -> procstat.ProcStat | None:
    """The process's stat line in the /proc below root (PIDs as that systemd counts them)."""
    try:
        with open(root / "proc" / str(pid) / "stat", "rb") as file:
            return procstat.parse(pid, file.read(4096))
    except (OSError, ValueError):
        return None


async def failure_of(watch: UnitWatch, journal: UnitJournal, since: datetime) -> str:
    """Why the unit did not start, in systemd's terms, with what it wrote since `since`."""
    why = start_failure(watch.exec_main_code, watch.exec_main_status, watch.result, watch.job_result)
    try:
        entries = await journal.tail(watch.unit, 50, timeout=5.0)
    except BackendError as exc:
        log.warning("cannot read the journal of a failed unit", unit=watch.unit, error=str(exc))
        entries = []
    return f"agent {watch.agent_id} (unit {watch.unit}) did not start: {why}{quoted_output(entries, since)}"


def quoted_output(entries: Sequence[LogEntry], since: datetime) -> str:
    """The agent's last lines since `since`, quoted for a launch error ("" without any)."""
    # A second of slack: the journal's clock and ours round differently.
    after = since - timedelta(seconds=1)
    said = [
        e.text for e in entries if e.stream is not LogStream.OPMASD and e.time is not None and e.time >= after
    ][-_FAILURE_LINES:]
    return f"; it said: {' | '.join(said)}" if said else ""


async def clear_stale(
    manager: SystemdManager, agent_id: str, unit: str, removals: dict[str, asyncio.Event], instance: str = ""
) -> None:
    """Make the unit's name free: a unit of it that ended but is not yet unloaded is reset
    (and its removal awaited through `removals`, which the runtime's listener sets); one that
    runs, or another opmasd's, is a LaunchError. Asking systemd also orders the launch after
    every signal about the name's earlier units: they were sent before the answer."""
    try:
        state = await manager.unit_state(unit)
    except SystemdError as exc:
        if exc.name == NO_SUCH_UNIT:
            return
        raise LaunchError(f"cannot ask systemd about unit {unit}: {exc}") from None
    if is_foreign(state.description, instance):
        raise LaunchError(
            f"unit {unit} belongs to another opmasd on this systemd (instance {owner_of(state.description)}, "
            f"{state.active_state}): agent {agent_id} cannot run under that name here"
        )
    if state.active_state not in END_STATES:
        raise LaunchError(
            f"unit {unit} of agent {agent_id} is already {state.active_state} (pid {state.main_pid}) "
            "outside this daemon's watch: adopt it or stop it first"
        )
    removed = removals[unit] = asyncio.Event()
    try:
        log.info("resetting a stale unit", agent_id=agent_id, unit=unit, state=state.active_state)
        with contextlib.suppress(SystemdError):  # NoSuchUnit: unloaded meanwhile
            await manager.reset_failed_unit(unit)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(removed.wait(), _REMOVAL_WAIT)
    finally:
        del removals[unit]


async def write_env_file(files: EnvironmentFiles, unit: str, request: LaunchRequest) -> str:
    """The unit's environment file written; LaunchError naming what cannot be carried or written."""
    try:
        return await files.write(unit, request.environment)
    except ValueError as exc:
        raise LaunchError(f"agent {request.agent_id}: {exc}") from None
    except OSError as exc:
        raise LaunchError(f"cannot write the environment file of unit {unit}: {exc}") from None


async def start_unit(
    manager: SystemdManager,
    watch: UnitWatch,
    definition: TransientUnit,
    timeout: float,
    apply: Callable[[UnitChange], None],
) -> Outcome:
    """Start the unit and wait (up to timeout, then SIGKILL) for it to run or fail. A start whose
    answer systemd dropped (re-executing) is sent again unless the unit exists: then its state
    goes to apply() and the wait goes on."""
    assert watch.launching is not None
    unit = watch.unit
    try:
        await manager.start_transient_unit(unit, definition, mode="fail")
    except SystemdError as exc:
        if exc.name != BUS_NO_REPLY or not await _start_again(manager, unit, definition, apply):
            raise LaunchError(f"systemd refused to start unit {unit}: {exc}") from None
    try:
        async with asyncio.timeout(timeout):
            outcome = await watch.launching
            if outcome is Outcome.JOB_FAILED:
                await watch.until_ended(1.0)  # its exit status, if one comes
            return outcome
    except TimeoutError:
        with contextlib.suppress(SystemdError):
            await manager.kill_unit(unit, "all", signal.SIGKILL)
        raise LaunchError(
            f"unit {unit} was neither running nor failed after {timeout} s "
            f"({watch.active_state}/{watch.sub_state}); killed"
        ) from None


async def _start_again(
    manager: SystemdManager, unit: str, definition: TransientUnit, apply: Callable[[UnitChange], None]
) -> bool:
    """After a dropped StartTransientUnit: whether the unit is there now (started again if not)."""
    try:
        state = await manager.unit_state(unit)
    except SystemdError as exc:
        if exc.name != NO_SUCH_UNIT:
            return False
        try:
            await manager.start_transient_unit(unit, definition, mode="fail")
        except SystemdError as again:
            log.warning("a start sent again failed", unit=unit, error=str(again))
            return False
        return True
    apply(UnitChange(unit, ChangeKind.PROPERTIES, active_state=state.active_state, sub_state=state.sub_state,
                     main_pid=state.main_pid, exec_main_code=state.exec_main_code,
                     exec_main_status=state.exec_main_status, result=state.result))  # fmt: skip
    return True
