"""The HTTP server: REST routes from the proto, the OpenAPI document, /metrics, /healthz, /readyz.

One aiohttp server on the daemon's event loop, on rest.address (TCP, HTTPS when TLS is
configured: api.tls) and, optionally, a unix socket (always plain); HTTP/1.1 with keep-alive.
aiohttp takes over no signal handling. Every path that is not one of the fixed endpoints goes
to the gateway, which answers 404 / 405 in the same error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from google.rpc import code_pb2

from opmasd.api.audit_records import Auditor
from opmasd.api.auth import Gate
from opmasd.api.errors import bad_request_status, code_name, to_status_pb
from opmasd.api.grpc_server import ListenError, give_socket
from opmasd.api.refusal_pacing import host_of
from opmasd.api.rest.gateway import (
    JSON,
    RestGateway,
    closing,
    error_response,
    rest_peer,
    routing_error,
    transport_peer,
)
from opmasd.core.auth import Role
from opmasd.core.errors import OpmasError

log = structlog.get_logger(__name__)

OPENAPI_PATH = "/api/v1/openapi.json"
# Answered to anyone: whether the daemon lives and is ready, for probes and load balancers.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Seconds an idle keep-alive connection (or one still sending its request head) is kept.
IDLE_TIMEOUT = 15.0
# Open HTTP connections at most; past it a new one is closed at once, so that clients cannot
# use up the daemon's file descriptors (1024 by default) and starve gRPC, agents and the store.
MAX_CONNECTIONS = 256
# One host may hold at most this share of the TCP address's connections (1/4), so that one
# host holding connections open (idle, or trickling headers) cannot lock every other out.
HOST_SHARE = 4


class HttpListenError(Exception):
    """The HTTP listener could not be bound; the message names the address."""


@dataclass(frozen=True)
class HttpListeners:
    # host:port; port 0 picks a free port (see HttpServer.port). "" for none.
    address: str = ""
    socket_path: Path | None = None
    socket_mode: int = 0o660
    socket_gid: int | None = None  # None: the daemon's own group
    # HTTPS on the TCP address (api.tls.ServerTls.rest_context); None: plain HTTP.
    ssl_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class Endpoints:
    """What the fixed endpoints serve, as plain callables (the app wires them)."""

    openapi: Callable[[], dict[str, Any]]
    # (body, content type) of the Prometheus exposition, for the scraper's Accept header.
    metrics: Callable[[str], tuple[bytes, str]] | None = None
    alive: Callable[[], bool] = lambda: True
    # (ready, each check's verdict)
    ready: Callable[[], tuple[bool, dict[str, str]]] = lambda: (True, {})


class _MalformedRequests(logging.Filter):
    """Drops aiohttp's error log of a request it could not parse (it answers 400 itself): any
    client could otherwise fill the daemon's log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())


class HttpServer:
    def __init__(
        self,
        gateway: RestGateway,
        endpoints: Endpoints,
        listeners: HttpListeners,
        grace: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
        gate: Gate | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        """gate: who may ask for what (api.auth); None only in tests of the transcoding alone.
        auditor: where requests refused here (before they reach the gate's RPC check) go."""
        self._gateway = gateway
        self._gate = gate
        self._auditor = auditor
        self._max_connections = max_connections
        self._grace = grace
        self._endpoints = endpoints
        self._listeners = listeners
        self._openapi: bytes | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._fixed: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            OPENAPI_PATH: self._serve_openapi,
            "/metrics": self._serve_metrics,
            "/healthz": self._serve_healthz,
            "/readyz": self._serve_readyz,
        }

    async def start(self) -> None:
        # The gateway bounds bodies itself (413); errors aiohttp raises keep the Status shape.
        app = web.Application(client_max_size=0, middlewares=[_status_shaped_errors])
        # [\s\S]: every path, newlines (%0A) included, reaches the gateway's own 404/400.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._dispatch)
        # handler_cancellation: a client that goes away ends its stream at once.
        # shutdown_timeout: how long unary calls in flight get at stop (the gRPC grace period).
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._grace,
            # An idle connection, or one trickling its headers, is closed after this long.
            keepalive_timeout=IDLE_TIMEOUT,
            # Compressed bodies are refused (415): inflating one would outgrow the body limit.
            auto_decompress=False,
        )
        await runner.setup()
        _cap_connections(runner.server, self._max_connections)
        self._runner = runner
        listeners = self._listeners
        try:
            if listeners.address:
                host, _, port = listeners.address.rpartition(":")
                site = _TcpSite(
                    runner, host.strip("[]"), int(port), ssl_context=listeners.ssl_context, reuse_address=True
                )
                await site.start()
                tcp = [a for a in runner.addresses if isinstance(a, tuple)]
                self.port = int(tcp[0][1]) if tcp else int(port)
            if listeners.socket_path is not None:
                await self._start_unix(runner, listeners)
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            where = listeners.address or str(listeners.socket_path)
            raise HttpListenError(f"cannot listen for HTTP on {where}: {exc.strerror or exc}") from exc
        log.info(
            "HTTP serving",
            address=listeners.address or None,
            port=self.port,
            tls=(listeners.ssl_context is not None) if listeners.address else None,
            socket=str(listeners.socket_path) if listeners.socket_path else None,
            routes=len(self._gateway.routes),
        )

    async def _start_unix(self, runner: web.AppRunner, listeners: HttpListeners) -> None:
        path = listeners.socket_path
        assert path is not None
        _clear_socket_path(path)
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old_umask)
        try:
            give_socket(path, listeners.socket_mode, listeners.socket_gid)
        except ListenError as exc:
            raise HttpListenError(str(exc)) from exc

    async def stop(self) -> None:
        """Stop listening, end open streams now, give unary calls up to the grace period."""
        await self._gateway.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._listeners.socket_path is not None:
            _clear_socket_path(self._listeners.socket_path)

    # -- dispatch ------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self._gate is not None and request.path not in OPEN_PATHS:
            # Before the body is read: a caller without credentials costs a header lookup. The
            # role of an API call is then checked with the call (api.auth_interceptor).
            refused = await self._refused(request, self._gate)
            if refused is not None:
                return refused
        fixed = self._fixed.get(request.path)
        if fixed is None:
            return await self._gateway.handle(request)
        if request.method not in ("GET", "HEAD"):
            return routing_error(
                405,
                code_pb2.UNIMPLEMENTED,
                f"{request.method} is not allowed on {request.path}; use GET",
                headers={"Allow": "GET, HEAD"},
            )
        return await fixed(request)

    async def _refused(self, request: web.Request, gate: Gate) -> web.Response | None:
        if len(request.headers.getall("Authorization", ())) > 1:
            refused = error_response(
                bad_request_status("Authorization", "give one Authorization header, not several")
            )
            return _closing(refused, request)
        caller = gate.caller(request.headers.get("Authorization", ""), rest_peer(request), "rest")
        try:
            if caller.role is None or request.path in self._fixed:  # the document and metrics
                gate.require(caller, Role.VIEWER, request.path)
        except OpmasError as exc:
            # Not logged one by one (a flood would fill the log): the trail folds a burst.
            if self._auditor is not None:
                operation = f"{request.method} {request.path}"[:64]
                self._auditor.refused_request(caller, operation, code_name(exc), exc.message)
            headers = {"WWW-Authenticate": 'Bearer realm="opmasd"'} if caller.role is None else None
            await gate.pace_refusal(caller)  # a flood of them is answered at its host's pace
            return _closing(error_response(to_status_pb(exc), headers), request)
        return None

    async def _serve_openapi(self, request: web.Request) -> web.StreamResponse:
        if self._openapi is None:
            document = await asyncio.to_thread(self._endpoints.openapi)
            self._openapi = json.dumps(document, indent=1).encode()
        return web.Response(body=self._openapi, content_type=JSON)

    async def _serve_metrics(self, request: web.Request) -> web.StreamResponse:
        if self._endpoints.metrics is None:
            return routing_error(404, code_pb2.NOT_FOUND, "metrics are not enabled")
        body, content_type = self._endpoints.metrics(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _serve_healthz(self, request: web.Request) -> web.StreamResponse:
        alive = self._endpoints.alive()
        body = {"status": "alive" if alive else "not alive"}
        return web.json_response(body, status=200 if alive else 503)

    async def _serve_readyz(self, request: web.Request) -> web.StreamResponse:
        ready, checks = self._endpoints.ready()
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return web.json_response(body, status=200 if ready else 503)


class _TcpSite(web.TCPSite):
    """aiohttp's TCPSite with the TLS handshake bounded by IDLE_TIMEOUT (asyncio's default is
    60 s): a connection still in its handshake is not yet one of the server's connections, so
    the connection cap (MAX_CONNECTIONS) does not see it."""

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=IDLE_TIMEOUT,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def _clear_socket_path(path: Path) -> None:
    """Make room for the socket: its folder exists, a stale socket (never another file) is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink(missing_ok=True)


def _cap_connections(server: web.Server | None, tcp_limit: int) -> None:
    """Close each connection past its listener's cap as soon as it is made (logged once per
    burst): `tcp_limit` for the TCP address, MAX_CONNECTIONS for the unix socket, counted apart
    so that a flood of the network's connections never locks out the local socket."""
    if server is None:
        return
    made, lost = server.connection_made, server.connection_lost
    open_now: dict[bool, set[Any]] = {True: set(), False: set()}  # is unix -> its handlers
    per_host: Counter[str] = Counter()  # TCP connections by host (IPv4 address, IPv6 /64)
    host_of_handler: dict[Any, str] = {}
    host_limit = max(1, tcp_limit // HOST_SHARE)
    refused = 0

    def connection_made(handler: Any, transport: Any) -> None:
        nonlocal refused
        made(handler, transport)
        sock = transport.get_extra_info("socket")
        unix = sock is not None and sock.family == socket.AF_UNIX
        limit = MAX_CONNECTIONS if unix else tcp_limit
        host = None if unix else host_of(transport_peer(transport))
        if len(open_now[unix]) >= limit or (host is not None and per_host[host] >= host_limit):
            # After aiohttp has set the connection up (closing inside this call trips its
            # request loop): at the next turn, close it without reading a byte.
            asyncio.get_running_loop().call_soon(handler.force_close)
            asyncio.get_running_loop().call_soon(transport.close)
            refused += 1
            if refused in (1, 100) or refused % 10_000 == 0:
                listener = "unix socket" if unix else "TCP address"
                log.warning(
                    "HTTP connection refused: too many open", listener=listener, limit=limit, refused=refused
                )
            return
        open_now[unix].add(handler)
        if host is not None:
            per_host[host] += 1
            host_of_handler[handler] = host

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        open_now[True].discard(handler)
        open_now[False].discard(handler)
        host = host_of_handler.pop(handler, None)
        if host is not None:
            per_host[host] -= 1
            if per_host[host] <= 0:
                del per_host[host]
        lost(handler, exc)

    # aiohttp has no connection limit of its own; its Server tracks connections through these.
    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


@web.middleware
async def _status_shaped_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own HTTP errors (raised before or around the gateway) as Status JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == JSON:
            raise
        code = code_pb2.NOT_FOUND if exc.status == 404 else code_pb2.INVALID_ARGUMENT
        return routing_error(exc.status, code, exc.reason or "bad request")


def _closing(response: web.Response, request: web.Request) -> web.Response:
    """A refusal that closes the connection when the request has a body: kept open, aiohttp
    would read that body to its end (unbounded, for a chunked one) before the next request."""
    return closing(response) if request.can_read_body else response
