"""How many bytes of calls a D-Bus connection may have in flight: a window under its send buffer.

dbus-fast's writer takes a send() that finds the socket's buffer full (EAGAIN) for a broken
connection and drops it (python-dbus-next #153; still so in dbus-fast 5.2), failing every call
in flight: 100 agents started at once lost the bus. A call's bytes stay in the socket's buffer
until the bus daemon has read them, which it has once the call is answered. So the calls in
flight (sent, not yet answered) are kept to a quarter of the send buffer the kernel granted
(it counts its own overhead against the same buffer), and a send never finds it full. A call
larger than the window goes alone, when nothing else is in flight: into an empty buffer a send
writes what fits and dbus-fast waits for room for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import structlog
from dbus_fast import Variant

log = structlog.get_logger(__name__)

# What opmasd asks for: room for many calls at their largest (a spec is at most 128 KiB).
WANTED_BUFFER = 4 << 20
_SO_SNDBUFFORCE = 32  # Linux: SO_SNDBUF past net.core.wmem_max; needs CAP_NET_ADMIN
# A message's header and the marshalling's padding, over its strings' own bytes.
_OVERHEAD = 256


def size_send_buffer(sock: socket.socket) -> int:
    """Ask for WANTED_BUFFER (forced past the system's maximum where opmasd may), and return
    the window this socket allows: a quarter of the buffer the kernel granted."""
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF) if os.geteuid() == 0 else (socket.SO_SNDBUF,):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, WANTED_BUFFER)
            break
        except OSError as exc:  # SO_SNDBUFFORCE without CAP_NET_ADMIN: the plain option
            log.debug("D-Bus send buffer option refused", option=option, error=str(exc))
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return max(granted // 4, 4096)


def approx_size(value: Any) -> int:
    """About how many bytes a call body marshals to (strings and arrays dominate)."""
    if isinstance(value, str | bytes | bytearray):
        return len(value) + 8
    if isinstance(value, Variant):
        return approx_size(value.value) + 8
    if isinstance(value, list | tuple):
        return sum(approx_size(v) for v in value) + 8
    if isinstance(value, dict):
        return sum(approx_size(k) + approx_size(v) for k, v in value.items()) + 8
    return 8


class SendWindow:
    """The bytes of the calls in flight on one connection, kept under `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, body: list[Any]) -> AsyncIterator[None]:
        """Room for a call of this body while it is in flight (waits for calls to end first)."""
        size = approx_size(body) + _OVERHEAD
        while self.used and self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            while self._waiters:  # each checks again whether its call fits now
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
