"""The systemd runtime's link to systemd kept up: a lost bus connection is seen, logged, and made
again; after it (and after systemd re-executed) the watched units' states are read again.

Signals stop with the connection, and systemd keeps no record of what a client missed. So:

- the Reconnector waits on the connection's end (dbus-fast's wait_for_disconnect: the bus
  daemon restarted, the socket closed), logs it as an error, tells the runtime (whose calls
  then fail at once with why, instead of waiting for signals that cannot come), and connects
  and subscribes again with backoff (RECONNECT_FIRST doubling to RECONNECT_MAX);
- resync() then reads every watched unit's state (GetAll) and hands it to the runtime as one
  change: a unit that ended meanwhile is reported once, with the status systemd still holds;
  when it is gone (collected), with the status systemd wrote in the journal ("Main process
  exited, code=killed, status=9/KILL") since the connection was lost, or else as ended with no
  status left;
- a daemon-reexec keeps the connection (to the bus daemon) but drops systemd's side for a
  moment: calls in flight are retried (runtime.systemd_dbus), and when systemd takes its bus
  name again the runtime resyncs the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta

import structlog

from opmasd.core.errors import BackendError
from opmasd.core.logs import LogStream
from opmasd.runtime.systemd_dbus import NO_SUCH_UNIT, SystemdError, SystemdManager
from opmasd.runtime.systemd_journal import UnitJournal
from opmasd.runtime.systemd_units import ChangeKind, UnitChange
from opmasd.runtime.systemd_watch import CLD_DUMPED, CLD_EXITED, CLD_KILLED, UnitWatch

log = structlog.get_logger(__name__)

RECONNECT_FIRST = 0.2  # seconds before the first attempt
RECONNECT_MAX = 10.0
GONE_RESULT = "it ended while opmasd was not connected to systemd"
_EXITED = re.compile(r"Main process exited, code=(exited|killed|dumped), status=(\d+)")
_CODES = {"exited": CLD_EXITED, "killed": CLD_KILLED, "dumped": CLD_DUMPED}
_JOURNAL_LINES = 30
# Statuses looked up in the journal only from a moment before the loss: the clocks of journald
# and opmasd round differently, and an older line would be an earlier unit of the same name.
_SLACK = timedelta(seconds=1)
StatusLookup = Callable[[str], Awaitable[tuple[int, int] | None]]


async def journal_status(journal: UnitJournal, unit: str, since: datetime) -> tuple[int, int] | None:
    """(ExecMainCode, ExecMainStatus) of the unit's last exit as systemd wrote it in the journal
    after `since`; None when it wrote none (or the journal cannot be read)."""
    try:
        entries = await journal.tail(unit, _JOURNAL_LINES, timeout=5.0)
    except BackendError as exc:
        log.warning("cannot read the journal of a unit that ended unseen", unit=unit, error=str(exc))
        return None
    for entry in reversed(entries):
        if entry.stream is not LogStream.OPMASD or entry.time is None or entry.time < since - _SLACK:
            continue
        if match := _EXITED.search(entry.text):
            return _CODES[match.group(1)], int(match.group(2))
    return None


class Reconnector:
    """Watches one SystemdManager's connection and makes it again (see the module doc)."""

    def __init__(
        self,
        manager: SystemdManager,
        where: str,
        reconnect: Callable[[], Awaitable[None]],
        lost: Callable[[], None],
        back: Callable[[], Awaitable[None]],
        first_delay: float = RECONNECT_FIRST,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """reconnect: connect and subscribe again (SystemdError when it cannot); lost: called
        when the connection ends; back: called once it is made again."""
        self._manager = manager
        self._where = where
        self._reconnect = reconnect
        self._lost = lost
        self._back = back
        self.first_delay = first_delay
        self._sleep = sleep  # a fake clock's in tests
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.reconnects = 0  # connections made again, for tests and logs

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="systemd-reconnect")

    async def _run(self) -> None:
        while not self._closing:
            await self._manager.wait_disconnected()
            if self._closing:
                return
            log.error("lost the connection to systemd's bus; agent units are not watched until it is back",
                      bus=self._where)  # fmt: skip
            self._lost()
            delay = self.first_delay
            while not self._closing:
                await self._sleep(delay)
                try:
                    await self._reconnect()
                    break
                except SystemdError as exc:
                    log.warning("cannot reconnect to systemd's bus yet", bus=self._where, error=str(exc),
                                retry_in=min(delay * 2, RECONNECT_MAX))  # fmt: skip
                    delay = min(delay * 2, RECONNECT_MAX)
            if self._closing:
                return
            self.reconnects += 1
            log.warning("reconnected to systemd's bus", bus=self._where)
            try:
                await self._back()
            except Exception:
                log.exception("resync after reconnecting failed")

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def resync(
    manager: SystemdManager,
    watches: Iterable[UnitWatch],
    apply: Callable[[UnitChange], None],
    lookup: StatusLookup | None = None,
) -> int:
    """Read each watched unit's state again and pass it to apply() as one change (a gone unit
    as its removal, with the status `lookup` finds for it); the number of units found ended."""
    ended = 0
    for watch in list(watches):
        try:
            state = await manager.unit_state(watch.unit)
        except SystemdError as exc:
            if exc.name != NO_SUCH_UNIT:
                log.error("cannot read a unit's state after reconnecting", unit=watch.unit, error=str(exc))
                continue
            if watch.ended or not watch.started:
                continue  # its end is known already, or its launch is still waiting
            log.warning("agent unit ended while its signals were lost", unit=watch.unit)
            ended += 1
            status = None if lookup is None or watch.exec_main_code else await lookup(watch.unit)
            if status is not None:
                watch.exec_main_code, watch.exec_main_status = status
            elif not watch.exec_main_code:
                watch.result = GONE_RESULT
            apply(UnitChange(watch.unit, ChangeKind.UNIT_REMOVED))
            continue
        apply(
            UnitChange(
                watch.unit,
                ChangeKind.PROPERTIES,
                active_state=state.active_state,
                sub_state=state.sub_state,
                main_pid=state.main_pid,
                exec_main_code=state.exec_main_code,
                exec_main_status=state.exec_main_status,
                result=state.result,
            )
        )
        if watch.ended:
            ended += 1
    return ended
