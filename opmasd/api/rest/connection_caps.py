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
from typing import Any

import structlog
from aiohttp import web

from opmasd.api.host_caps import HostCaps
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
        self.tcp = HostCaps(tcp_limit, HOST_SHARE, "REST TCP address")
        self.unix = HostCaps(MAX_UNIX, 1, "REST unix socket")
        self._counted: dict[Any, tuple[HostCaps, str | None]] = {}  # connection -> where counted

    def install(self, server: web.Server | None) -> None:
        """Count (and cap) the connections `server` sets up."""
        if server is None:
            return
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: Any) -> None:
            made(handler, transport)
            sock = transport.get_extra_info("socket")
            unix = sock is not None and sock.family == socket.AF_UNIX
            caps, host = (self.unix, None) if unix else (self.tcp, host_of(transport_peer(transport)))
            if not caps.admit(host):
                # After aiohttp has set the connection up (closing inside this call trips its
                # request loop): at the next turn, close it without reading a byte.
                asyncio.get_running_loop().call_soon(handler.force_close)
                asyncio.get_running_loop().call_soon(transport.close)
                return
            self._counted[handler] = (caps, host)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            counted = self._counted.pop(handler, None)
            if counted is not None:
                counted[0].release(counted[1])
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    # -- TLS handshakes (rest/tls_site.py) ---------------------------------------------------------

    def begin_handshake(self, host: str | None) -> bool:
        """Whether a TCP connection just accepted may begin its TLS handshake (counted until
        end_handshake); False: close it unread."""
        return self.tcp.admit(host)

    def end_handshake(self, host: str | None) -> None:
        self.tcp.release(host)

    @property
    def tcp_open(self) -> int:
        """TCP connections held now: set up, or in their handshake."""
        return self.tcp.open
