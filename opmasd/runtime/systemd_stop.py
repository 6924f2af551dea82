"""Agent units that opmasd ends: a stop (terminate), and at start, the units found running and
the stop of those nobody adopts.

A stop is systemd's StopUnit job: SIGTERM to every process of the unit's cgroup
(KillMode=control-group). A running unit's stop timeout cannot be changed (SetUnitProperties
refuses TimeoutStopUSec), so the caller's timeout is kept here: past it, SIGKILL to the whole
cgroup with KillUnit. Either way the end is seen as for any exit, through the unit's signals
(UnitWatch.gone).

Units outlive opmasd, so a starting daemon lists the `opmas-agent-*.service` units that run
(ListUnitsByPatterns, then each one's state: its MainPID and cgroup) before recovery, for the
runtime's synchronous adopt() to answer from. What recovery leaves unadopted (an agent deleted,
or never recorded) is stopped by reap_unmanaged, REAP_STOP_SECONDS before SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal

import structlog

from opmasd.core.errors import BackendError
from opmasd.core.tasks import event_within
from opmasd.runtime.systemd_dbus import DISCONNECTED, NO_SUCH_UNIT, SystemdError, SystemdManager
from opmasd.runtime.systemd_units import UNIT_PATTERN, UnitState, agent_id_from_unit
from opmasd.runtime.systemd_watch import END_STATES, UnitWatch

log = structlog.get_logger(__name__)

REAP_STOP_SECONDS = 5.0
KILL_WAIT = 5.0  # after SIGKILL, for the cgroup to empty; said again at this interval
_KILL_TRIES = 12  # a minute of SIGKILLs, then a stop gives up
_CONCURRENT_CALLS = 16


async def stop_unit(manager: SystemdManager, watch: UnitWatch, timeout: float) -> None:
    """Stop the unit: SIGTERM, SIGKILL after `timeout`; returns once its end was signalled (or
    the runtime closed: watch.gone set without an exit). BackendError when it outlives a
    minute of SIGKILLs (a process stuck in the kernel)."""
    unit = watch.unit
    try:
        await manager.stop_unit(unit)
    except SystemdError as exc:
        if exc.name == NO_SUCH_UNIT:
            log.info("unit to stop has ended", unit=unit)  # its end is signalled, or was
        elif exc.name == DISCONNECTED:
            raise _lost(unit, exc) from None
        else:
            log.warning("cannot stop unit; killing it", unit=unit, error=str(exc))
            timeout = 0.0
    if await event_within(watch.gone, timeout):
        return
    log.warning("unit still running after its stop timeout; SIGKILL", unit=unit, timeout=timeout)
    for _ in range(_KILL_TRIES):
        try:
            await manager.kill_unit(unit, "all", signal.SIGKILL)
        except SystemdError as exc:
            if exc.name == DISCONNECTED:
                raise _lost(unit, exc) from None
            if exc.name != NO_SUCH_UNIT:
                log.error("cannot kill unit", unit=unit, error=str(exc))
        if await event_within(watch.gone, KILL_WAIT):
            return
        log.error("unit still running after SIGKILL", unit=unit)
    raise BackendError(f"unit {unit} did not stop, even after SIGKILL")


def _lost(unit: str, exc: SystemdError) -> BackendError:
    """A stop without a connection fails at once (it would otherwise wait out every timeout)."""
    return BackendError(f"cannot stop unit {unit}: the connection to systemd is lost ({exc.text}); "
                        "opmasd is reconnecting")  # fmt: skip


async def find_units(manager: SystemdManager) -> tuple[list[str], list[UnitState]]:
    """The agent units loaded now (any state, any owner), and those of them that have a running
    process. SystemdError when systemd cannot be asked."""
    listed = await manager.list_units_by_patterns([UNIT_PATTERN])
    names = [info.name for info in listed if info.active_state not in END_STATES]
    gate = asyncio.Semaphore(_CONCURRENT_CALLS)

    async def state_of(name: str) -> UnitState | None:
        async with gate:
            try:
                return await manager.unit_state(name)
            except SystemdError as exc:
                if exc.name == NO_SUCH_UNIT:
                    return None  # ended and unloaded since the listing
                raise

    states = await asyncio.gather(*(state_of(name) for name in names))
    return [info.name for info in listed], [
        state
        for state in states
        if state is not None
        and state.main_pid > 0
        and state.active_state not in END_STATES
        and agent_id_from_unit(state.name) is not None
    ]


async def reap(manager: SystemdManager, watches: list[UnitWatch]) -> list[str]:
    """Stop every unit (UnitWatch.reaped: the runtime receives their signals) at once; one line
    each, in order."""
    return list(await asyncio.gather(*(_reap_one(manager, watch) for watch in watches)))


async def _reap_one(manager: SystemdManager, watch: UnitWatch) -> str:
    what = f"unit {watch.unit} (agent {watch.agent_id!r}, pid {watch.main_pid}), which no agent adopted"
    try:
        await stop_unit(manager, watch, REAP_STOP_SECONDS)
    except BackendError as exc:
        return f"{what}: {exc}"
    if watch.exit is None:
        return f"{what}: not seen to stop (the runtime closed)"
    log.warning("stopped an unadopted agent unit", unit=watch.unit, pid=watch.main_pid)
    return f"stopped {what} ({watch.exit.reason})"
