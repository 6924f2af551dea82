"""Process-runtime agents in transient scopes of the systemd running opmasd: they outlive its unit.

opmasd's unit (KillMode=mixed or control-group) kills what is left in its cgroup when it
stops: every agent the process runtime started, and the log relay holding their output pipes.
With scopes (agents.process_scopes) each agent is moved, before its program runs, into a
transient scope `opmas-proc-<escaped id>.scope`, and each log relay into
`opmas-logrelay-<pid>.scope`, in the slice of opmasd's unit: cgroups that the unit does not
contain, so `systemctl restart opmasd` leaves them running and the next opmasd adopts them
(same PIDs, logs continuing through the same relay).

The window: the agent is spawned waiting at a gate (runtime.scope_cgroups); the scope is made
with its PID (StartTransientUnit, PIDs=), the start job awaited (JobRemoved), the move checked
in /proc/PID/cgroup, and only then may the program run. Before it does, the relay that holds
its pipes is in a scope too, so no agent ever runs with output that dies with opmasd's unit.

The scope's cgroup is then the agent's tree (CgroupTrees over ScopeCgroups): a stop signals
and kills every member; systemd collects the scope once it is empty.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from dbus_fast import Variant

from opmasd.core.errors import LaunchError
from opmasd.runtime import procstat, signals
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.cgroups import cgroup2_mount, own_cgroup
from opmasd.runtime.scope_cgroups import (
    Gate,
    ScopeCgroups,
    ScopeLimits,
    relay_scope_name,
    scope_controllers,
    scope_name,
    waiting_command,
)
from opmasd.runtime.systemd_dbus import (
    MANAGER,
    NO_SUCH_UNIT,
    PROPERTIES,
    SYSTEMD,
    UNIT,
    UNIT_EXISTS,
    SystemdError,
    SystemdManager,
)
from opmasd.runtime.systemd_units import ChangeKind, UnitChange

log = structlog.get_logger(__name__)

_JOB_PREFIX = "/org/freedesktop/systemd1/job/"


class ScopeManager(SystemdManager):
    """SystemdManager plus the calls scopes need (a scope is no TransientUnit service)."""

    async def start_scope(self, name: str, properties: list[tuple[str, str, Any]]) -> int:
        """Start the scope; the id of its start job."""
        props = [[key, Variant(sig, value)] for key, sig, value in properties]
        body = await self._call(SYSTEMD, "/org/freedesktop/systemd1", MANAGER, "StartTransientUnit",
                                "ssa(sv)a(sa(sv))", [name, "fail", props, []])  # fmt: skip
        return _job_id(str(body[0]))

    async def unit_of_pid(self, pid: int) -> str:
        """The name of the unit whose cgroup holds `pid`."""
        path = await self._call(SYSTEMD, "/org/freedesktop/systemd1", MANAGER, "GetUnitByPID", "u", [pid])
        body = await self._call(SYSTEMD, str(path[0]), PROPERTIES, "Get", "ss", [UNIT, "Id"])
        value = body[0]
        return str(value.value if isinstance(value, Variant) else value)


class _Jobs:
    """JobRemoved results by job id, for the units being waited on (a signal may come before the
    reply that names its job)."""

    def __init__(self) -> None:
        self.results: dict[int, str] = {}
        self.changed = asyncio.Event()

    async def result(self, job_id: int) -> str:
        while job_id not in self.results:
            self.changed.clear()
            await self.changed.wait()
        return self.results[job_id]


class ProcessScopes:
    """Scopes for the process runtime's agents and log relays (see the module doc)."""

    def __init__(
        self,
        manager: ScopeManager,
        base: Path,
        slice_name: str,
        timeout: float,
        controllers: frozenset[str] = frozenset(),
        bus: str = "",
    ) -> None:
        """bus: where to connect again when the connection ends ("": nowhere)."""
        self.cgroups = ScopeCgroups(base)
        self.limits = ScopeLimits(controllers)
        self._manager = manager
        self._bus = bus
        self._slice = slice_name
        self._timeout = timeout
        self._jobs: dict[str, _Jobs] = {}
        self._relay_pid: int | None = None  # a relay started and not yet in a scope
        self._relay_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        manager.add_listener(self._on_change)

    @classmethod
    async def connect(cls, bus: str, timeout: float = 5.0) -> tuple[ProcessScopes | None, str]:
        """Scopes where opmasd runs as a service of the systemd on `bus`; else None and why not."""
        own, mount = own_cgroup(), cgroup2_mount()
        if own is None or mount is None:
            return None, "opmasd is in no cgroup2 cgroup"
        unit = own.rsplit("/", 1)[-1]
        if not unit.endswith(".service") or own.count("/") < 2:
            return None, f"opmasd does not run in a systemd service (its cgroup is {own})"
        if bus == "system" and os.geteuid() != 0:
            # systemd lets only root (or whom polkit allows) create units in the system manager.
            return None, "opmasd is not root, and the system manager creates scopes only for root"
        manager = ScopeManager(timeout)
        try:
            await manager.connect(bus)
            managed_by = await manager.unit_of_pid(os.getpid())
            if managed_by != unit:
                await manager.close()
                return None, f"the systemd on the {bus} bus puts opmasd in {managed_by}, not {unit}"
            await manager.subscribe(prefix="opmas-")
        except SystemdError as exc:
            await manager.close()
            return None, f"systemd's {bus} bus did not answer: {exc}"
        slice_dir = own.rsplit("/", 1)[0]
        controllers = scope_controllers(mount)
        base, slice_name = mount / slice_dir.lstrip("/"), slice_dir.rsplit("/", 1)[-1]
        scopes = cls(manager, base, slice_name, timeout, controllers, bus)
        limits = ", ".join(sorted(controllers)) or "none"
        return scopes, f"agents in scopes of {slice_dir} (opmasd is {unit}; limits by {limits})"

    # -- launching ----------------------------------------------------------------------------

    def gated(self, request: LaunchRequest) -> tuple[LaunchRequest, Gate]:
        """The launch with its program waiting at a new gate until place() lets it run."""
        if request.agent_id in self.cgroups.placing:
            raise LaunchError(f"agent {request.agent_id} is being launched already")
        gate = Gate.open(self.limits.properties(request.resources))
        return replace(request, command=waiting_command(request.command)), gate

    async def place(
        self, agent_id: str, popen: subprocess.Popen[bytes], gate: Gate, note: Callable[[str, str], None]
    ) -> None:
        """Move the child waiting at `gate` into the agent's scope (with its relay in one), then
        let it run. LaunchError when it cannot be: the child is killed (and reaped), and
        note(agent_id, why) tells the agent's log."""
        pid = popen.pid
        self.cgroups.placing.add(agent_id)
        try:
            await self._place_relay()
            await self._start_scope(scope_name(agent_id), pid, f"opmas agent {agent_id}", gate.limits)
            gate.go()
        except (SystemdError, OSError, ValueError, TimeoutError) as exc:
            message = f"cannot move agent {agent_id} (pid {pid}) into a scope: {exc}"
            log.error("agent launch failed", agent_id=agent_id, error=message)
            note(agent_id, f"pid {pid} not started: {message}")
            # It would end at the closed gate too; killed, its reaping does not wait on it.
            signals.kill_group(pid)
            popen.wait()
            raise LaunchError(message) from exc
        finally:
            gate.close()
            self.cgroups.placing.discard(agent_id)

    def relay_started(self, pid: int) -> None:
        """RelayLink's hook: a relay was started; into a scope with it (the next launch waits)."""
        self._relay_pid = pid
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # started off the loop: the next launch moves it, before its agent runs
            log.warning("log relay started off the event loop; moved at the next launch", pid=pid)
            return
        task = loop.create_task(self._relay_in_background(), name="relay-scope")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay_in_background(self) -> None:
        try:
            await self._place_relay()
        except (SystemdError, OSError, ValueError, TimeoutError) as exc:
            log.error("cannot move the log relay into a scope (the next launch tries again)", error=str(exc))

    async def _place_relay(self) -> None:
        async with self._relay_lock:
            pid = self._relay_pid
            if pid is None:
                return
            stat = procstat.read(pid)
            if stat is not None and not stat.zombie:
                await self._start_scope(relay_scope_name(pid), pid, "opmas log relay")
                log.info("log relay in its own scope", pid=pid, scope=relay_scope_name(pid))
            if self._relay_pid == pid:
                self._relay_pid = None

    async def _start_scope(
        self, name: str, pid: int, description: str, limits: tuple[tuple[str, str, Any], ...] = ()
    ) -> None:
        if not self._manager.connected and self._bus:
            # The bus went away (dbus restarted): its signals and calls start over on a new one.
            log.warning("connecting to systemd's bus again, for scopes", bus=self._bus)
            await self._manager.connect(self._bus)
            await self._manager.subscribe(prefix="opmas-")
        properties: list[tuple[str, str, Any]] = [
            ("Description", "s", description),
            ("PIDs", "au", [pid]),
            ("Slice", "s", self._slice),
            ("CollectMode", "s", "inactive-or-failed"),
            *limits,
        ]
        jobs = self._jobs[name] = _Jobs()
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    job = await self._manager.start_scope(name, properties)
                except SystemdError as exc:
                    if exc.name != UNIT_EXISTS:
                        raise
                    await self._stop_stale(name, jobs)
                    job = await self._manager.start_scope(name, properties)
                result = await jobs.result(job)
        finally:
            del self._jobs[name]
        if result != "done":
            raise SystemdError("org.freedesktop.systemd1.JobFailed", f"start of {name}: {result}")
        cgroup = procstat_cgroup(pid)
        if cgroup is None or not cgroup.endswith(f"/{name}"):
            raise SystemdError("org.freedesktop.systemd1.JobFailed", f"pid {pid} is in {cgroup}, not {name}")

    async def _stop_stale(self, name: str, jobs: _Jobs) -> None:
        """A scope of that name is still loaded (an earlier run's, not yet collected): stop it
        when it is empty, else refuse (something of the agent's still runs there)."""
        left = _first_members(self.cgroups.base / name)
        if left:
            pids = ", ".join(p.decode() for p in left)
            raise SystemdError(UNIT_EXISTS, f"{name} still has processes: {pids}")
        log.info("stopping an earlier scope of the same name", scope=name)
        try:
            stop = _job_id(await self._manager.stop_unit(name))
        except SystemdError as exc:
            if exc.name != NO_SUCH_UNIT:
                raise
            return
        await jobs.result(stop)

    def _on_change(self, change: UnitChange) -> None:
        jobs = self._jobs.get(change.unit)
        if jobs is not None and change.kind is ChangeKind.JOB_REMOVED and change.job_id is not None:
            jobs.results[change.job_id] = change.job_result or ""
            jobs.changed.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._manager.close()


def procstat_cgroup(pid: int) -> str | None:
    """The cgroup2 path of `pid` ("0::<path>" in /proc/PID/cgroup), None when it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as file:
            lines = file.read(1 << 16).splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(b"0::"):
            return os.fsdecode(line[3:])
    return None


def _first_members(cgroup: Path) -> list[bytes]:
    """The first PIDs in a cgroup (a bounded read: enough to tell it is not empty, and name some)."""
    try:
        with open(cgroup / "cgroup.procs", "rb") as file:
            return file.read(4096).split()
    except FileNotFoundError:
        return []


def _job_id(path: str) -> int:
    if not path.startswith(_JOB_PREFIX):
        raise SystemdError("org.freedesktop.DBus.Error.InvalidArgs", f"not a job path: {path}")
    return int(path[len(_JOB_PREFIX) :])
