"""systemd's manager over D-Bus (dbus-fast, asyncio): transient units, their state and its changes.

A thin typed client of org.freedesktop.systemd1.Manager: it speaks plain values (the dataclasses
of runtime.systemd_units) and never lets a dbus-fast type or error out. Every failure is a
SystemdError carrying a D-Bus error name — systemd's own (UnitExists, NoSuchUnit, ...) or the
standard one for what went wrong on the way (NoServer, AuthFailed, NoReply, Disconnected) — and
every call gives up after `timeout` seconds.

State changes arrive as signals, never by polling: subscribe() adds the match rules for
JobRemoved, UnitRemoved and the units' PropertiesChanged first, then calls Manager.Subscribe()
(systemd sends neither before some client subscribed, and a rule added after a unit started
can miss its first changes). Each signal reaches every listener as a UnitChange, on the loop.

    manager = SystemdManager(timeout=5)
    await manager.connect("system")         # or "user", or a D-Bus address
    manager.add_listener(queue.put_nowait)
    await manager.subscribe(prefix="opmas-agent-")
    await manager.start_transient_unit("opmas-agent-x.service", TransientUnit(("/bin/sleep", "9")))
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
import socket
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from dbus_fast import BusType, DBusFastError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from opmasd.core.errors import BackendError
from opmasd.runtime.dbus_window import SendWindow, size_send_buffer
from opmasd.runtime.systemd_units import (
    UNIT_PATH_PREFIX,
    ChangeKind,
    TransientUnit,
    UnitChange,
    UnitInfo,
    UnitState,
    properties_change,
    transient_properties,
    unit_from_object_path,
    unit_state,
)

log = structlog.get_logger(__name__)

# At most this many calls in flight on a connection (and at most its SendWindow of bytes).
_IN_FLIGHT = 16

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
BUS_DRIVER = "org.freedesktop.DBus"  # the sender of NameOwnerChanged (no client can forge it)

# Error names: systemd's own that callers act on, and the standard ones this module raises.
UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
NO_SERVER = "org.freedesktop.DBus.Error.NoServer"
AUTH_FAILED = "org.freedesktop.DBus.Error.AuthFailed"
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
# What the bus answers for systemd while it re-executes (daemon-reexec): a call in flight is
# dropped ("recipient disconnected ... without replying", which BUS_NO_REPLY marks apart from
# this module's own timeouts), and one sent meanwhile finds no owner of its name.
BUS_NO_REPLY = "org.freedesktop.DBus.Error.NoReply (bus)"
_ABSENT = frozenset(
    {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner", BUS_NO_REPLY}
)
_RETRY_FIRST = 0.05  # seconds before a call systemd dropped is sent again; doubled each time

CHANGED = "sa{sv}as"  # PropertiesChanged(interface, changed, invalidated)

Listener = Callable[[UnitChange], None]
Callback = Callable[[], None]


class SystemdError(BackendError):
    """A call to systemd failed; `name` is the D-Bus error name, `text` its message."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def bus_address(where: str) -> str:
    """The D-Bus address of "system", "user" (systemd --user's bus, as sd-bus finds it), or an
    address given as is."""
    if where == "system":
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "unix:path=/run/dbus/system_bus_socket"
    if where == "user":
        if address := os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            return address
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return f"unix:path={runtime_dir}/bus"
    return where


def _send_window(bus: MessageBus) -> SendWindow:
    """The connection's window of bytes in flight (runtime.dbus_window says why)."""
    sock = getattr(bus, "_sock", None)  # dbus-fast keeps its socket there; no public handle
    if not isinstance(sock, socket.socket):
        log.warning("cannot size the D-Bus socket's send buffer: dbus-fast has no _sock")
        return SendWindow(212992 // 4)  # Linux's default buffer
    return SendWindow(size_send_buffer(sock))


def _plain(value: Any) -> Any:
    """A value received from dbus-fast without its Variant wrappers."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


async def _disconnect_of(bus: MessageBus) -> None:
    # Shielded: a waiter cancelled (the reconnect watcher, closing) must not cancel dbus-fast's
    # own future, which every other waiter, close() included, awaits too.
    with contextlib.suppress(OSError, EOFError, DBusFastError):
        await asyncio.shield(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]


class SystemdManager:
    """One connection to systemd's manager (see the module doc)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._bus: MessageBus | None = None
        self._listeners: list[Listener] = []
        self._prefix = ""
        self._reloading = False  # between systemd's Reloading(true) and Reloading(false)
        # Called when systemd takes its bus name again (after a daemon-reexec): signals sent
        # meanwhile may be lost, so the runtime reads its units' states again.
        self._returned: list[Callback] = []
        self._slots = asyncio.Semaphore(_IN_FLIGHT)
        self._window = SendWindow(212992 // 4)

    # -- connection ---------------------------------------------------------------------------

    async def connect(self, where: str = "system") -> None:
        """Connect to "system", "user" or a D-Bus address (`unix:path=...`)."""
        await self.close()
        address = bus_address(where)
        bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM, auth_timeout=self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                await bus.connect()
        except TimeoutError:
            raise SystemdError(NO_REPLY, f"no answer from {address} within {self.timeout} s") from None
        except OSError as exc:
            raise SystemdError(NO_SERVER, f"cannot connect to {address}: {exc}") from None
        except DBusFastError as exc:
            raise SystemdError(AUTH_FAILED, f"{address}: {exc}") from None
        self._window = _send_window(bus)
        bus.add_message_handler(self._on_message)
        self._bus = bus
        self._reloading = False  # a Reloading(false) lost with an earlier connection

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def wait_disconnected(self) -> None:
        """Return when the connection ends (bus daemon gone, close()): a watcher's cue to
        connect and subscribe again, since signals stop with it."""
        if self._bus is not None:
            await _disconnect_of(self._bus)

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.remove_message_handler(self._on_message)
        bus.disconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                await _disconnect_of(bus)

    # -- signals ------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call listener(change) on the loop for every signal about a watched unit."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def on_systemd_returned(self, callback: Callback) -> None:
        """Call callback() on the loop when systemd takes its bus name again (daemon-reexec)."""
        self._returned.append(callback)

    async def subscribe(self, prefix: str = "") -> None:
        """Receive state changes of the units whose names start with prefix (all when "")."""
        self._prefix = prefix
        rule = f"type='signal',sender='{SYSTEMD}'"
        for match in (
            f"{rule},interface='{MANAGER}',member='JobRemoved'",
            f"{rule},interface='{MANAGER}',member='UnitRemoved'",
            f"{rule},interface='{MANAGER}',member='Reloading'",
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{SYSTEMD}'",
            f"{rule},interface='{PROPERTIES}',member='PropertiesChanged',"
            f"path_namespace='{UNIT_PATH_PREFIX.rstrip('/')}'",
        ):
            await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "AddMatch", "s", [match])  # fmt: skip
        await self._manager("Subscribe")

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        change: UnitChange | None = None
        if msg.member == "NameOwnerChanged" and msg.sender == BUS_DRIVER and msg.signature == "sss":
            if msg.body[0] == SYSTEMD:
                self._owner_changed(msg.body[2])
            return
        if msg.interface == MANAGER and msg.member == "JobRemoved" and msg.signature == "uoss":
            job_id, _job, unit, result = msg.body
            change = UnitChange(unit, ChangeKind.JOB_REMOVED, job_id=job_id, job_result=result)
        elif msg.interface == MANAGER and msg.member == "Reloading" and msg.signature == "b":
            self._reloading = bool(msg.body[0])
        elif msg.interface == MANAGER and msg.member == "UnitRemoved" and msg.signature == "so":
            # A reload (`systemctl daemon-reload`, which every package install runs) unloads
            # and loads every unit again: a unit removed then is not a unit that ended.
            if not self._reloading:
                change = UnitChange(msg.body[0], ChangeKind.UNIT_REMOVED)
        elif msg.interface == PROPERTIES and msg.member == "PropertiesChanged" and msg.signature == CHANGED:
            interface, changed, _invalidated = msg.body
            unit = unit_from_object_path(msg.path or "")
            if unit is not None and interface in (UNIT, SERVICE):
                change = properties_change(unit, _plain(changed))
        if change is None or not change.unit.startswith(self._prefix):
            return
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("systemd_listener_failed", unit=change.unit)

    def _owner_changed(self, owner: str) -> None:
        if not owner:
            log.warning("systemd left the bus (re-executing?)")
            return
        self._reloading = False  # a Reloading(false) may have been lost with it
        log.warning("systemd is back on the bus", owner=owner)
        for callback in list(self._returned):
            try:
                callback()
            except Exception:
                log.exception("systemd_returned_callback_failed")

    # -- units --------------------------------------------------------------------------------

    async def start_transient_unit(self, name: str, unit: TransientUnit, mode: str = "fail") -> str:
        """Create and start the unit; returns the start job's object path. SystemdError
        UNIT_EXISTS when a unit of that name is loaded (running, or failed and not collected)."""
        try:
            props = [[key, Variant(sig, value)] for key, sig, value in transient_properties(unit)]
        except (ValueError, TypeError, DBusFastError) as exc:
            raise SystemdError(INVALID_ARGS, f"{name}: {exc}") from None
        # Not sent twice: the first may have started the unit (the runtime finds out).
        body = await self._manager(
            "StartTransientUnit", "ssa(sv)a(sa(sv))", [name, mode, props, []], retry=False
        )
        return str(body[0])

    async def stop_unit(self, name: str, mode: str = "replace") -> str:
        """Queue the unit's stop job; returns its object path (JobRemoved tells when it is done)."""
        return str((await self._manager("StopUnit", "ss", [name, mode]))[0])

    async def kill_unit(self, name: str, whom: str = "all", signal: int = signals.SIGTERM) -> None:
        """Send a signal to the unit's processes: whom is "main", "control" or "all"."""
        await self._manager("KillUnit", "ssi", [name, whom, int(signal)])

    async def reset_failed_unit(self, name: str) -> None:
        await self._manager("ResetFailedUnit", "s", [name])

    async def list_units_by_patterns(
        self, patterns: Sequence[str], states: Sequence[str] = ()
    ) -> list[UnitInfo]:
        """The loaded units whose names match a glob of patterns (and a state of states, if any)."""
        body = await self._manager("ListUnitsByPatterns", "asas", [list(states), list(patterns)])
        return [
            UnitInfo(
                name=row[0],
                description=row[1],
                load_state=row[2],
                active_state=row[3],
                sub_state=row[4],
                object_path=row[6],
                job_id=row[7],
            )
            for row in body[0]
        ]

    async def unit_state(self, name: str) -> UnitState:
        """The unit's state now; SystemdError NO_SUCH_UNIT when it is not loaded (or collected)."""
        path = str((await self._manager("GetUnit", "s", [name]))[0])
        props: dict[str, Any] = {}
        for interface in (UNIT, SERVICE):
            body = await self._call(SYSTEMD, path, PROPERTIES, "GetAll", "s", [interface])
            props.update(_plain(body[0]))
        return unit_state(name, props)

    # -- calls --------------------------------------------------------------------------------

    async def _manager(
        self, member: str, signature: str = "", body: list[Any] | None = None, *, retry: bool = True
    ) -> list[Any]:
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER, member, signature, body or [], retry=retry)

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
        *,
        retry: bool = True,
    ) -> list[Any]:
        """One call; while systemd re-executes (BUS_NO_REPLY, no owner of its name), sent again
        with backoff until `timeout` has passed, when `retry` (the call can be repeated)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay = _RETRY_FIRST
        while True:
            try:
                return await self._call_once(destination, path, interface, member, signature, body)
            except SystemdError as exc:
                if not retry or destination != SYSTEMD or exc.name not in _ABSENT:
                    raise
                if loop.time() + delay > deadline:
                    raise SystemdError(
                        NO_REPLY, f"{member}: systemd did not come back ({exc.text})"
                    ) from None
                log.info("systemd did not answer; calling again", member=member, error=str(exc), delay=delay)
            await asyncio.sleep(delay)
            delay *= 2

    async def _call_once(
        self, destination: str, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> list[Any]:
        bus = self._bus
        if bus is None or not bus.connected:
            raise SystemdError(DISCONNECTED, f"{member}: not connected to systemd's bus")
        try:
            message = Message(destination=destination, path=path, interface=interface, member=member,
                              signature=signature, body=body)  # fmt: skip
            async with asyncio.timeout(self.timeout), self._slots, self._window.hold(body):
                reply = await bus.call(message)
        except TimeoutError:
            raise SystemdError(NO_REPLY, f"{member}: no reply within {self.timeout} s") from None
        except (ValueError, TypeError) as exc:  # marshalling: the body does not fit the signature
            raise SystemdError(INVALID_ARGS, f"{member}: {exc}") from None
        except (OSError, EOFError, DBusFastError) as exc:
            raise SystemdError(DISCONNECTED, f"{member}: {exc or type(exc).__name__}") from None
        if reply is None:  # dbus-fast's answer to a call in flight when the bus was closed
            raise SystemdError(DISCONNECTED, f"{member}: the connection was closed")
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            raise SystemdError(BUS_NO_REPLY if name == NO_REPLY else name, text)
        return list(reply.body)
