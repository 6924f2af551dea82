"""How many connections the HTTP listeners hold: ConnectionCaps.

aiohttp has no connection limit of its own. ConnectionCaps counts the connections its Server
sets up (connection_made / connection_lost) and closes each one past its listener's cap at
once: `tcp_limit` for the TCP address, of which one host (an IPv4 address, an IPv6 /64) holds
at most a quarter, and MAX_UNIX for the unix socket, counted apart, so that a flood of the
network's connections never locks out the local socket. Connections still in their TLS
handshake are not yet the Server's: the TLS site (rest/tls_site.py) counts those here too,
from their accept, so that the caps see them before they cost a handshake.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import structlog
from aiohttp import web

from opmasd.api.refusal_pacing import host_of
from opmasd.api.rest.gateway import transport_peer

log = structlog.get_logger(__name__)

MAX_UNIX = 256
# One host may hold at most this share of the TCP address's connections (1/4), so that one
# host holding connections open (idle, in a handshake, or trickling headers) cannot lock every
# other out.
HOST_SHARE = 4


class ConnectionCaps:
    def __init__(self, tcp_limit: int) -> None:
        self.tcp_limit = tcp_limit
        self.host_limit = max(1, tcp_limit // HOST_SHARE)
        self._open: dict[bool, set[Any]] = {True: set(), False: set()}  # is unix -> handlers
        self._per_host: Counter[str] = Counter()  # TCP connections (and handshakes) by host
        self._host_of: dict[Any, str] = {}
        self._handshakes = 0
        self._refused = 0

    def install(self, server: web.Server | None) -> None:
        """Count (and cap) the connections `server` sets up."""
        if server is None:
            return
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: Any) -> None:
            made(handler, transport)
            sock = transport.get_extra_info("socket")
            unix = sock is not None and sock.family == socket.AF_UNIX
            host = None if unix else host_of(transport_peer(transport))
            if (unix and len(self._open[True]) >= MAX_UNIX) or (not unix and not self._admits(host)):
                # After aiohttp has set the connection up (closing inside this call trips its
                # request loop): at the next turn, close it without reading a byte.
                asyncio.get_running_loop().call_soon(handler.force_close)
                asyncio.get_running_loop().call_soon(transport.close)
                self.refused("unix socket" if unix else "TCP address")
                return
            self._open[unix].add(handler)
            if host is not None:
                self._per_host[host] += 1
                self._host_of[handler] = host

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._open[True].discard(handler)
            self._open[False].discard(handler)
            self._release(self._host_of.pop(handler, None))
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    # -- TLS handshakes (rest/tls_site.py) ---------------------------------------------------------

    def begin_handshake(self, host: str | None) -> bool:
        """Whether a TCP connection just accepted may begin its TLS handshake (counted until
        end_handshake); False: close it unread."""
        if not self._admits(host):
            self.refused("TCP address")
            return False
        self._handshakes += 1
        if host is not None:
            self._per_host[host] += 1
        return True

    def end_handshake(self, host: str | None) -> None:
        self._handshakes -= 1
        self._release(host)

    @property
    def tcp_open(self) -> int:
        """TCP connections held now: set up, or in their handshake."""
        return len(self._open[False]) + self._handshakes

    def _admits(self, host: str | None) -> bool:
        if self.tcp_open >= self.tcp_limit:
            return False
        return host is None or self._per_host[host] < self.host_limit

    def _release(self, host: str | None) -> None:
        if host is not None:
            self._per_host[host] -= 1
            if self._per_host[host] <= 0:
                del self._per_host[host]

    def refused(self, listener: str) -> None:
        self._refused += 1
        if self._refused in (1, 100) or self._refused % 10_000 == 0:
            log.warning("HTTP connection refused: too many open", listener=listener, refused=self._refused)
