"""The systemd backend: every agent is a transient service unit, started over D-Bus.

An agent runs as `opmas-agent-<escaped id>.service` (runtime.systemd_units), created with
StartTransientUnit on the system bus (or the user bus, or any D-Bus address), its limits as
unit properties: MemoryMax, CPUQuotaPerSecUSec, TasksMax, LimitNOFILE. The unit outlives
opmasd (no PartOf/BindsTo to it); a restarted daemon finds it by name and adopts it.

Restarts are opmasd's alone: the unit has Restart=no and no start limit
(StartLimitIntervalUSec=0), so systemd never restarts an agent nor refuses to start one that
crash-looped; the manager's restart policy (backoff, stability window, crash-loop limit) is the
one source of truth, as under the process runtime. CollectMode=inactive-or-failed unloads the
unit as soon as it ends, so the next start can reuse its name; its exit status arrives in the
signals before that.

State comes from signals only (PropertiesChanged, JobRemoved, UnitRemoved after Subscribe()),
never by polling: runtime.systemd_watch merges them and tells the exit, reported once per
process. The program runs under systemd-cat, which execs it (the unit's MainPID is the agent)
with its stdout and stderr on two journal streams of different priorities, so that the journal
tells them apart (runtime.systemd_journal). CPU, memory and OOM kills come from the unit's
cgroup files (runtime.systemd_cgroup).

A stop is systemd's StopUnit job (SIGTERM to the unit's whole cgroup), then SIGKILL to all of
it by KillUnit once terminate's timeout has passed (runtime.systemd_stop): a running unit's
TimeoutStopUSec cannot be changed. begin_terminate does nothing here: StopUnit sends the
SIGTERM itself (a KillUnit before it would make that a second one), and terminate's calls are
a few D-Bus messages, so a bulk stop's units all get theirs at once anyway.

The agent's environment (its NATS credentials) goes to systemd in a file of opmasd's alone,
never as the public Environment= (runtime.systemd_env). Units carry this opmasd's instance id in
their Description; another opmasd's units are left alone (runtime.systemd_owner). A lost bus
connection is logged, made again with backoff, and the watched units' states are read again,
as after a daemon-reexec (runtime.systemd_reconnect).

Tests drive a systemd booted in namespaces of its own: `root` (/proc/<its PID>/root) is where
its cgroup files and its /proc (PIDs as it counts them) are seen from here, and the
JournalSource names its journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.errors import BackendError, LaunchError
from opmasd.core.logs import LogEntry
from opmasd.core.model import ProcessHandle, ProcessUsage, ResourceLimits
from opmasd.runtime.base import ExitHandler, LaunchRequest
from opmasd.runtime.systemd_cgroup import CgroupLayout, OomWatch, UnitUsage
from opmasd.runtime.systemd_dbus import SystemdError, SystemdManager
from opmasd.runtime.systemd_env import EnvironmentFiles
from opmasd.runtime.systemd_journal import JournalSource, UnitJournal
from opmasd.runtime.systemd_launch import (
    agent_unit,
    check_program,
    clear_stale,
    failure_of,
    quota_refusals,
    read_stat,
    start_unit,
    unit_refusals,
    write_env_file,
)
from opmasd.runtime.systemd_owner import split_owned
from opmasd.runtime.systemd_reconnect import Reconnector, journal_status, resync
from opmasd.runtime.systemd_stop import find_units, reap, stop_unit
from opmasd.runtime.systemd_units import (
    UNIT_PREFIX,
    ChangeKind,
    UnitChange,
    UnitState,
    agent_id_from_unit,
    escape_unit_name,
)
from opmasd.runtime.systemd_watch import END_STATES, Outcome, UnitWatch

log = structlog.get_logger(__name__)

START_TIMEOUT = 10.0  # for a unit to be running or failed
DEFAULT_ENV_DIR = Path("/run/opmasd/systemd-env")
RESYNC_BACK = timedelta(seconds=10)


class SystemdRuntime:
    """The Runtime protocol over transient systemd units. Use it from the event loop's thread;
    connect() before anything else (see the module doc)."""

    def __init__(
        self,
        bus: str = "system",
        journal: JournalSource | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        root: Path = Path("/"),
        call_timeout: float = 10.0,
        start_timeout: float = START_TIMEOUT,
        instance: str = "",
        env_dir: Path = DEFAULT_ENV_DIR,
        hidden: tuple[str, ...] = (),
    ) -> None:
        """bus: "system", "user" or a D-Bus address; journal: where journalctl reads (default:
        the machine's journal); root: where the filesystem of that systemd is seen from here
        ("/", or /proc/PID/root for one in other namespaces: its cgroups and its /proc);
        instance: this opmasd's instance id, marked on its units ("": units unmarked, every
        agent unit counts as ours); env_dir: where the units' environment files go (as that
        systemd sees it: opmasd's runtime directory); hidden: paths no agent unit may see."""
        self._bus = bus
        self._root = root
        self._clock = clock
        self._start_timeout = start_timeout
        self._manager = SystemdManager(timeout=call_timeout)
        self._journal = UnitJournal(journal)
        # A few stat() calls: which limits this host's cgroups can enforce is known at once.
        self._layout = CgroupLayout.find(root)
        self._exit_handler: ExitHandler | None = None
        self._watched: dict[str, UnitWatch] = {}  # by agent id
        self._units: dict[str, UnitWatch] = {}  # by unit name (with the reaped ones)
        self._found: dict[str, UnitState] = {}  # running at connect, not adopted yet
        self._removals: dict[str, asyncio.Event] = {}
        # While connect() lists the running units: those that end meanwhile (not to be adopted).
        self._ended_while_listing: set[str] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._connected = False
        self._closed = False
        self._instance = instance
        self._env, self._hidden = EnvironmentFiles(env_dir, root), hidden
        self._foreign: dict[str, str] = {}  # other opmasd's units found: unit -> its instance
        self._reconnector = Reconnector(self._manager, bus, self._reopen, self._lost, self._resync)
        self._resyncing: asyncio.Task[None] | None = None
        self._lost_at: datetime | None = None

    def set_exit_handler(self, handler: ExitHandler) -> None:
        self._exit_handler = handler

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        return self._layout.refusals(resources) + quota_refusals(resources)

    def id_refusals(self, agent_id: str) -> list[tuple[str, str]]:
        """(field, why) when the agent cannot have a unit here: its id makes a unit name over
        systemd's limit, or another opmasd's unit holds that name."""
        return unit_refusals(agent_id, self._foreign)

    # --- connecting -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to systemd, subscribe to its units' changes (before any unit starts), and
        find the agent units that are running, for adopt(). BackendError when systemd's bus
        cannot be reached."""
        try:
            self._manager.add_listener(self._on_change)
            self._manager.on_systemd_returned(self._systemd_returned)
            await self._reopen()
            ended = self._ended_while_listing = set()
            loaded, found = await find_units(self._manager)
        except SystemdError as exc:
            await self._manager.close()
            raise BackendError(f"the systemd runtime cannot reach systemd ({self._bus} bus): {exc}") from exc
        self._ended_while_listing = None
        self._env.sweep(loaded)
        self._found, self._foreign = split_owned([s for s in found if s.name not in ended], self._instance)
        self._connected = True
        self._reconnector.start()
        log.info("systemd runtime connected", bus=self._bus, units_found=sorted(self._found))

    async def _reopen(self) -> None:
        await self._manager.connect(self._bus)
        await self._manager.subscribe(prefix=UNIT_PREFIX)

    def _lost(self) -> None:
        self._connected = False
        self._lost_at = self._clock.now()

    async def _resync(self) -> None:
        """After a reconnect or systemd's return: every watched unit's state read again (a unit
        collected meanwhile: its exit as the journal has it since the loss, or since RESYNC_BACK
        for systemd's re-exec, whose start is not seen)."""
        self._connected = not self._closed
        since, self._lost_at = self._lost_at or self._clock.now() - RESYNC_BACK, None
        lookup = functools.partial(journal_status, self._journal, since=since)
        ended = await resync(self._manager, self._units.values(), self._on_change, lookup)
        log.info("agent units read again", watched=len(self._units), ended=ended)

    def _systemd_returned(self) -> None:
        if self._resyncing is None or self._resyncing.done():
            self._resyncing = asyncio.get_running_loop().create_task(self._resync(), name="systemd-resync")

    # --- signals ----------------------------------------------------------------------------

    def _on_change(self, change: UnitChange) -> None:
        """Every signal about an agent unit, on the loop."""
        if change.kind is ChangeKind.UNIT_REMOVED:
            self._foreign.pop(change.unit, None)
            if event := self._removals.get(change.unit):
                event.set()
        watch = self._units.get(change.unit)
        if watch is None:
            if change.active_state in END_STATES or change.kind is ChangeKind.UNIT_REMOVED:
                self._found.pop(change.unit, None)  # it will not be adopted now
                if self._ended_while_listing is not None:
                    self._ended_while_listing.add(change.unit)
            return
        watch.apply(change)
        if watch.launching is not None and not watch.launching.done():
            outcome = watch.outcome()
            if outcome is not None:
                watch.launching.set_result(outcome)
        if watch.ended and not watch.finishing:
            if watch.launching is not None:
                watch.exit_pending = True  # reported once launch() has returned the process
            else:
                self._finish(watch)

    def _finish(self, watch: UnitWatch) -> None:
        """The unit has ended: report its exit, after the OOM verdict (at once, unless the
        notifications are ambiguous: runtime.systemd_cgroup.OomWatch)."""
        if watch.finishing:
            return  # a signal that came after the end launch() deferred
        watch.finishing = True
        verdict = False if watch.oom is None else watch.oom.verdict()
        if verdict is not None:
            self._report(watch, verdict)
            return
        task = asyncio.get_running_loop().create_task(self._settle(watch), name=f"oom-verdict:{watch.unit}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _settle(self, watch: UnitWatch) -> None:
        assert watch.oom is not None
        self._report(watch, await watch.oom.settle())

    def _report(self, watch: UnitWatch, oom: bool) -> None:
        info = watch.exit_info(oom, self._clock.now())
        watch.exit = info
        watch.close()
        self._forget(watch)
        watch.gone.set()
        self._env.remove(watch.unit)
        if watch.reaped or watch.handle is None:
            return
        log.info("agent unit ended", agent_id=watch.agent_id, unit=watch.unit, reason=info.reason,
                 result=watch.result)  # fmt: skip
        if self._exit_handler is None:
            log.warning("no exit handler set; exit not reported", agent_id=watch.agent_id)
            return
        try:
            self._exit_handler(watch.agent_id, watch.handle, info)
        except Exception:
            log.exception("exit handler failed", agent_id=watch.agent_id, pid=watch.handle.pid)

    def _watch(self, watch: UnitWatch) -> None:
        if not watch.reaped:
            self._watched[watch.agent_id] = watch
        self._units[watch.unit] = watch

    def _forget(self, watch: UnitWatch) -> None:
        if self._watched.get(watch.agent_id) is watch:
            del self._watched[watch.agent_id]
        if self._units.get(watch.unit) is watch:
            del self._units[watch.unit]

    def _arm(self, watch: UnitWatch, control_group: str) -> None:
        """Usage sampling and (cgroup v1) the OOM watch of a running unit."""
        assert watch.handle is not None
        watch.usage = UnitUsage(self._layout, control_group, watch.handle.pid)
        watch.oom = OomWatch.start(self._layout, control_group)

    # --- launching --------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        agent_id = request.agent_id
        if self._closed or not self._connected:
            raise LaunchError(
                f"the systemd runtime is not connected to systemd's {self._bus} bus (reconnecting)"
            )
        if (existing := self._watched.get(agent_id)) is not None:
            raise LaunchError(f"agent {agent_id} already has a unit ({existing.unit})")
        if not request.command:
            raise LaunchError(f"agent {agent_id} has an empty command")
        refused = self._layout.refusals(request.resources)
        if refused:
            raise LaunchError("; ".join(f"{name}: {why}" for name, why in refused))
        try:
            unit = escape_unit_name(agent_id)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        check_program(self._root, request)
        await clear_stale(self._manager, agent_id, unit, self._removals, self._instance)
        if agent_id in self._watched:  # launched meanwhile
            raise LaunchError(f"agent {agent_id} is being launched already ({unit})")
        watch = UnitWatch(agent_id, unit, launching=asyncio.get_running_loop().create_future())
        self._watch(watch)
        started_at = self._clock.now()
        try:
            env_file = await write_env_file(self._env, unit, request)
            definition = agent_unit(request, self._instance, env_file, self._hidden)
            outcome = await start_unit(self._manager, watch, definition, self._start_timeout, self._on_change)
            if outcome is not Outcome.RUNNING:
                raise LaunchError(await failure_of(watch, self._journal, started_at))
            handle = ProcessHandle(watch.main_pid, self._start_time(watch.main_pid, agent_id))
            watch.handle = handle
            self._arm(watch, await self._control_group(unit))
        except BaseException:
            watch.close()
            self._forget(watch)
            self._env.remove(unit)
            raise
        finally:
            watch.launching = None
        if watch.exit_pending:
            asyncio.get_running_loop().call_soon(self._finish, watch)
        log.info("agent launched", agent_id=agent_id, unit=unit, pid=handle.pid, command=request.command)
        return handle

    def _start_time(self, pid: int, agent_id: str) -> float:
        stat = read_stat(self._root, pid)
        if stat is None:
            log.warning("cannot read the start time of an agent process", agent_id=agent_id, pid=pid)
            return 0.0
        return stat.start_time

    async def _control_group(self, unit: str) -> str:
        try:
            return (await self._manager.unit_state(unit)).control_group
        except SystemdError as exc:  # NoSuchUnit: it has ended already (its exit is pending)
            log.info("no cgroup for a unit", unit=unit, error=str(exc))
            return ""

    # --- adopting ---------------------------------------------------------------------------

    def adopt(self, agent_id: str, handle: ProcessHandle | None) -> ProcessHandle | None:
        existing = self._watched.get(agent_id)
        if existing is not None and existing.handle is not None:
            same = handle is None or existing.handle.pid == handle.pid
            return existing.handle if same else None
        if self._closed or not self._connected:
            log.warning("adopt: the systemd runtime is not connected", agent_id=agent_id)
            return None
        try:
            unit = escape_unit_name(agent_id)
        except ValueError:
            return None
        state = self._found.pop(unit, None)
        if state is None:
            return None  # no unit runs for it: nothing left behind either (the cgroup went with it)
        stat = read_stat(self._root, state.main_pid)
        if stat is None or stat.zombie:
            log.info("not adopting: the unit's process has ended", agent_id=agent_id, pid=state.main_pid)
            return None
        current = ProcessHandle(state.main_pid, stat.start_time)
        if handle is not None and handle.pid != current.pid:
            # The unit is the agent's whatever PID was recorded (a launch not committed).
            log.warning("adopting the agent's unit, not the recorded pid", agent_id=agent_id,
                        recorded=handle.pid, pid=current.pid)  # fmt: skip
        watch = UnitWatch(agent_id, unit, active_state=state.active_state, sub_state=state.sub_state,
                          main_pid=state.main_pid, started=True, running=True, handle=current)  # fmt: skip
        self._watch(watch)
        self._arm(watch, state.control_group)
        log.info("agent unit adopted", agent_id=agent_id, unit=unit, pid=current.pid)
        return current

    async def reap_unmanaged(self) -> list[str]:
        """Stop the agent units found at connect that nobody adopted; one line each."""
        left, self._found = self._found, {}
        watches = []
        for unit, state in sorted(left.items()):
            watch = UnitWatch(agent_id_from_unit(unit) or unit, unit, started=True, running=True,
                              main_pid=state.main_pid, reaped=True)  # fmt: skip
            self._watch(watch)
            watches.append(watch)
        return await reap(self._manager, watches)

    # --- stopping ---------------------------------------------------------------------------

    def begin_terminate(self, agent_id: str) -> None:
        """Nothing: StopUnit sends the SIGTERM (see the module doc)."""

    async def terminate(self, agent_id: str, timeout: float) -> None:
        watch = self._watched.get(agent_id)
        if watch is None:
            return
        log.info(
            "stopping agent unit", agent_id=agent_id, unit=watch.unit, pid=watch.main_pid, timeout=timeout
        )
        await stop_unit(self._manager, watch, timeout)
        if watch.exit is None:
            raise RuntimeError(f"the systemd runtime was closed before agent {agent_id} exited")

    # --- observing --------------------------------------------------------------------------

    def usage(self, agent_id: str) -> ProcessUsage | None:
        watch = self._watched.get(agent_id)
        if watch is None or watch.usage is None:
            return None
        return watch.usage.sample(self._clock.monotonic())

    async def tail_logs(self, agent_id: str, lines: int) -> list[LogEntry]:
        try:
            unit = escape_unit_name(agent_id)
        except ValueError:
            return []
        return await self._journal.tail(unit, lines)

    def follow_logs(self, agent_id: str) -> AsyncIterator[LogEntry]:
        try:
            unit = escape_unit_name(agent_id)
        except ValueError:
            return _no_entries()
        return self._journal.follow(unit)

    async def rotate_logs(self) -> None:
        """Nothing: journald caps its own files (SystemMaxUse=, RuntimeMaxUse=)."""

    async def aclose(self) -> None:
        """Stop watching and close the bus; the units keep running for a later daemon."""
        self._closed = True
        await self._reconnector.aclose()
        if self._resyncing is not None:
            self._resyncing.cancel()
        if self._finishing:
            _done, pending = await asyncio.wait(set(self._finishing), timeout=1.0)
            for task in pending:
                task.cancel()
        for watch in list(self._units.values()):
            watch.close()
            watch.gone.set()  # wakes terminate() calls in progress; they see no exit and raise
        left = sorted(self._watched)
        self._watched.clear()
        self._units.clear()
        with contextlib.suppress(ValueError):
            self._manager.remove_listener(self._on_change)
        await self._manager.close()
        self._connected = False
        log.info("systemd runtime closed", left_running=left)


async def _no_entries() -> AsyncIterator[LogEntry]:
    """The log of an id that cannot name a unit: empty."""
    nothing: tuple[LogEntry, ...] = ()
    for entry in nothing:
        yield entry


__all__ = ["JournalSource", "SystemdRuntime"]
