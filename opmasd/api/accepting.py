"""Accepting connections on a listening socket of opmasd's own (the TCP fronts of gRPC and of
REST over TLS, which count each connection from its accept)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# After a failed accept (out of file descriptors, and the like): a pause, not an end.
ACCEPT_PAUSE = 0.1


async def accepted(sock: socket.socket, listener: str) -> AsyncIterator[tuple[socket.socket, Any]]:
    """Each connection accepted on the non-blocking `sock`, with its peer address, until the
    task is cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            yield await loop.sock_accept(sock)
        except OSError as exc:
            log.warning("accept failed", listener=listener, error=str(exc))
            await asyncio.sleep(ACCEPT_PAUSE)
