"""REST's TCP address over TLS, with each connection counted from its accept: TlsSite.

asyncio's own TLS server hands a connection to the HTTP server only once its handshake is
done: until then it holds a socket and an SSL object (hundreds of KiB) that no cap sees, so a
client opening connections and stalling in their handshakes grew the daemon by gigabytes.
Here the site accepts itself: a connection past the listener's cap or its host's share
(ConnectionCaps) is closed at once, unread; the others begin their handshake counted, bounded
by the handshake timeout, and are then the HTTP server's (which counts them from there).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import structlog
from aiohttp import web

from opmasd.api.accepting import accepted
from opmasd.api.refusal_pacing import host_of
from opmasd.api.rest.connection_caps import ConnectionCaps
from opmasd.api.rest.gateway import address_peer

log = structlog.get_logger(__name__)


class TlsSite(web.BaseSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        caps: ConnectionCaps,
        handshake_timeout: float,
        backlog: int = 128,
        sock: socket.socket | None = None,
    ) -> None:
        """sock: a listening socket to serve (one systemd passed) instead of binding host:port."""
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port = host, port
        self._caps = caps
        self._handshake_timeout = handshake_timeout
        self._sock: socket.socket | None = None
        self._passed = sock
        self._accepting: asyncio.Task[None] | None = None
        self._handshaking: set[asyncio.Task[None]] = set()
        self.port = port

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        sock = self._passed
        if sock is None:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            sock = socket.create_server((self._host, self._port), family=family, backlog=self._backlog)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever(sock))

    async def stop(self) -> None:
        for task in (self._accepting, *self._handshaking):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._accepting, *self._handshaking) if t), return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        await super().stop()

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async for conn, address in accepted(sock, "HTTPS"):
            host = host_of(address_peer(address))
            if not self._caps.begin_handshake(host):
                conn.close()
                continue
            task = loop.create_task(self._handshake(conn, host))
            self._handshaking.add(task)
            task.add_done_callback(self._handshaking.discard)

    async def _handshake(self, conn: socket.socket, host: str | None) -> None:
        server = self._runner.server
        assert server is not None and self._ssl_context is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                server, conn, ssl=self._ssl_context, ssl_handshake_timeout=self._handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            conn.close()  # a failed or abandoned handshake (a client's matter: not logged each)
            log.debug("TLS handshake failed", peer=host, error=str(exc) or type(exc).__name__)
        finally:
            self._caps.end_handshake(host)
