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
from opmasd.api.rest.connection_caps import ConnectionCaps
from opmasd.api.rest.gateway import (
    JSON,
    RestGateway,
    closing,
    error_response,
    rest_peer,
    routing_error,
)
from opmasd.api.rest.tls_site import TlsSite
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
    # The listening socket systemd passed for `address` (systemd/listen_fds.py checked that it
    # is that address): served instead of binding one; TLS and the connection caps as ever.
    passed_socket: socket.socket | None = None


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
        caps = ConnectionCaps(self._max_connections)
        caps.install(runner.server)
        self._runner = runner
        listeners = self._listeners
        try:
            if listeners.address:
                host, _, port = listeners.address.rpartition(":")
                if listeners.ssl_context is not None:
                    # Its own accept: a connection is counted before its handshake (tls_site).
                    tls = TlsSite(
                        runner,
                        host.strip("[]"),
                        int(port),
                        listeners.ssl_context,
                        caps,
                        IDLE_TIMEOUT,
                        sock=listeners.passed_socket,
                    )
                    await tls.start()
                    self.port = tls.port
                elif listeners.passed_socket is not None:
                    await web.SockSite(runner, listeners.passed_socket).start()
                    self.port = int(listeners.passed_socket.getsockname()[1])
                else:
                    await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
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
            passed_by_systemd=listeners.passed_socket is not None or None,
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


def _clear_socket_path(path: Path) -> None:
    """Make room for the socket: its folder exists, a stale socket (never another file) is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink(missing_ok=True)


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
