"""The REST gateway: an HTTP request → its route → the gRPC method, called through a channel.

opmasd gives it the in-process channel of its own gRPC server (api/local_calls.py): every REST
call passes the same interceptors and the same servicer as a gRPC client's call, so there is no
second implementation of any check, without the cost of a loopback round trip (benchmark,
scenario 8). Any grpc.aio channel works as well (the tests serve a proto of their own so).

Once a unary call is sent it runs to its end even if the HTTP client goes away: the daemon
owns an operation it accepted. A stream ends when its client goes, and when the daemon stops.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog
from aiohttp import web
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

from opmas.jsonmap import message_json
from opmasd.api.errors import bad_request_status, http_status
from opmasd.api.local_calls import LocalChannel
from opmasd.api.rest.rules import Route
from opmasd.api.rest.transcode import BadRequest, build_request, response_json

log = structlog.get_logger(__name__)

JSON = "application/json"
NDJSON = "application/x-ndjson"
# A stream's first message (or its error) is awaited this long before the headers go out, so
# that a stream refused at once (unknown agent) gets its own HTTP status, not 200 + an error line.
FIRST_MESSAGE_WAIT = 0.25
_FORWARDED_HEADERS = ("authorization",)
_METADATA_PREFIX = "grpc-metadata-"
_RESERVED_METADATA = ("grpc-", "x-opmas-", ":")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_TIMEOUT = re.compile(r"[0-9]{1,8}[HMSmun]")


class Channel(Protocol):
    """What the gateway calls through: a grpc.aio.Channel, or the in-process one
    (api/local_calls.LocalChannel) that opmasd uses."""

    def unary_unary(self, method: str, **kwargs: Any) -> Any: ...

    def unary_stream(self, method: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class _Method:
    route: Route
    request_class: type[Message]
    response_class: type[Message]


def status_body(status: status_pb2.Status) -> bytes:
    """google.rpc.Status as grpc-gateway writes it: {"code", "message", "details"}."""
    return json.dumps(message_json(status)).encode()


def error_response(status: status_pb2.Status, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=http_status(status.code), body=status_body(status), content_type=JSON, headers=headers
    )


def routing_error(
    http: int, code: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """404 / 405 / 413 / 415 in the Status shape, with the HTTP status grpc-gateway gives them."""
    body = status_body(status_pb2.Status(code=code, message=message))
    return web.Response(status=http, body=body, content_type=JSON, headers=headers)


class RestGateway:
    def __init__(self, routes: list[Route], channel: Channel, max_body_bytes: int) -> None:
        self._routes = routes
        self._channel = channel
        # The in-process channel takes each call's HTTP peer (the gate decides on it); a real
        # grpc channel has a peer of its own.
        self._peer_aware = isinstance(channel, LocalChannel)
        self._max_body = max_body_bytes
        self._methods = {
            id(route): _Method(
                route,
                message_factory.GetMessageClass(route.method.input_type),
                message_factory.GetMessageClass(route.method.output_type),
            )
            for route in routes
        }
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def routes(self) -> list[Route]:
        return self._routes

    def match(self, http_method: str, raw_path: str) -> tuple[Route, dict[str, str]] | list[str] | None:
        """(route, path values); else the methods the path allows (for a 405); else None (404)."""
        allowed: list[str] = []
        for route in self._routes:
            values = route.template.match(raw_path)
            if values is None:
                continue
            if route.http_method == http_method:
                return route, values
            allowed.append(route.http_method)
        return sorted(set(allowed)) or None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        matched = self.match(request.method, request.rel_url.raw_path)
        if matched is None:
            return routing_error(404, code_pb2.NOT_FOUND, f"no route for {request.method} {request.path}")
        if isinstance(matched, list):
            return routing_error(
                405,
                code_pb2.UNIMPLEMENTED,
                f"{request.method} is not allowed on {request.path}; use {', '.join(matched)}",
                headers={"Allow": ", ".join(matched)},
            )
        route, path_values = matched
        method = self._methods[id(route)]
        body = await self._body(request, route)
        if isinstance(body, web.Response):
            return body
        try:
            message = build_request(route, method.request_class, path_values, request.query.items(), body)
        except BadRequest as exc:
            return error_response(bad_request_status(exc.field, exc.description))
        metadata = _metadata(request)
        timeout_header = request.headers.get("Grpc-Timeout", "")
        timeout = _grpc_timeout(timeout_header)
        if timeout_header and timeout is None:
            return error_response(
                bad_request_status(
                    "Grpc-Timeout", f"{timeout_header[:32]!r} is not a gRPC timeout (e.g. 5S, 200m)"
                )
            )
        peer = rest_peer(request)
        if route.server_streaming:
            return await self._stream(request, method, message, metadata, timeout, peer)
        return await self._unary(method, message, metadata, timeout, peer)

    async def _body(self, request: web.Request, route: Route) -> bytes | web.Response | None:
        if not route.body:
            return None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Decompressing would let a small body grow without bound before the limit applies.
            return closing(
                routing_error(
                    415, code_pb2.INVALID_ARGUMENT, f"Content-Encoding {encoding[:32]!r} is not supported"
                )
            )
        length = request.content_length
        if length is not None and length > self._max_body:
            return closing(_too_large(length, self._max_body))
        # To the end of the body (it may come in many chunks), never past the limit.
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > self._max_body:
                return closing(_too_large(None, self._max_body))
            chunks.append(chunk)
        data = b"".join(chunks)
        if data.strip() and request.content_type != JSON and not request.content_type.endswith("+json"):
            return routing_error(
                415,
                code_pb2.INVALID_ARGUMENT,
                f"Content-Type {request.content_type or '(none)'!r} is not supported: send {JSON}",
            )
        return data

    def _peer(self, peer: str) -> dict[str, str]:
        return {"peer": peer} if self._peer_aware else {}

    async def _unary(
        self,
        method: _Method,
        message: Message,
        metadata: list[tuple[str, str]],
        timeout: float | None,
        peer: str,
    ) -> web.Response:
        call = self._channel.unary_unary(
            method.route.grpc_path,
            request_serializer=_serialize,
            response_deserializer=method.response_class.FromString,
        )
        # Shielded: a client that disconnects (the handler is cancelled) stops waiting, but the
        # operation it asked for runs to its end.
        task = asyncio.ensure_future(call(message, metadata=metadata, timeout=timeout, **self._peer(peer)))
        try:
            response = await asyncio.shield(task)
        except grpc.aio.AioRpcError as exc:
            return error_response(_status_of(exc))
        body = json.dumps(response_json(method.route, response)).encode()
        return web.Response(body=body, content_type=JSON)

    async def _stream(
        self,
        request: web.Request,
        method: _Method,
        message: Message,
        metadata: list[tuple[str, str]],
        timeout: float | None,
        peer: str,
    ) -> web.StreamResponse:
        if self._closing:
            return error_response(_STOPPING)
        call = self._channel.unary_stream(
            method.route.grpc_path,
            request_serializer=_serialize,
            response_deserializer=method.response_class.FromString,
        )(message, metadata=metadata, **self._peer(peer))  # the deadline is ours, below
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        messages = call.__aiter__()
        pending: asyncio.Future[Any] = asyncio.ensure_future(messages.__anext__())
        try:
            done, _ = await asyncio.wait({pending}, timeout=FIRST_MESSAGE_WAIT)
            if done and isinstance(pending.exception(), grpc.aio.AioRpcError):
                return error_response(_status_of(pending.exception()))  # type: ignore[arg-type]
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
            try:
                # The deadline covers the whole stream, whichever task reads its messages.
                async with asyncio.timeout(timeout):
                    await self._pump(request, response, method.route, messages, pending)
            except TimeoutError:
                await _write_line(response, {"error": message_json(_DEADLINE)})
            return response
        finally:
            self._streams.discard(task)
            if not pending.done():
                pending.cancel()
            call.cancel()

    async def _pump(
        self,
        request: web.Request,
        response: web.StreamResponse,
        route: Route,
        messages: Any,
        pending: asyncio.Future[Any],
    ) -> None:
        """Write each message as a {"result": …} line until the stream ends, fails or is cut."""
        try:
            while True:
                try:
                    item = await pending
                except StopAsyncIteration:
                    return
                await _write_line(response, {"result": response_json(route, item)})
                pending = asyncio.ensure_future(messages.__anext__())
        except grpc.aio.AioRpcError as exc:
            await _write_line(response, {"error": message_json(_status_of(exc))})
        except asyncio.CancelledError:
            if not self._closing:
                raise  # the client went away: nothing to tell it
            await _write_line(response, {"error": message_json(_STOPPING)})
        except (ConnectionError, RuntimeError) as exc:
            log.debug("REST stream client gone", path=request.path, error=str(exc))
        finally:
            if not pending.done():
                pending.cancel()

    async def close(self) -> None:
        """End every open stream now (daemon shutdown), instead of waiting out the grace period."""
        self._closing = True
        streams = list(self._streams)
        for task in streams:
            task.cancel()
        if streams:
            await asyncio.gather(*streams, return_exceptions=True)


_STOPPING = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="opmasd is stopping")
_DEADLINE = status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message="Deadline Exceeded")


async def _write_line(response: web.StreamResponse, value: Any) -> None:
    try:
        await response.write(json.dumps(value).encode() + b"\n")
    except (ConnectionError, RuntimeError) as exc:
        log.debug("REST stream line not delivered", error=str(exc))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def closing(response: web.Response) -> web.Response:
    """The response, with the connection closed after it: the unread rest of the body is not
    drained (and, compressed, not inflated) on the event loop."""
    response.force_close()
    return response


def _too_large(length: int | None, limit: int) -> web.Response:
    size = f" of {length} bytes" if length is not None else ""
    return routing_error(
        413, code_pb2.RESOURCE_EXHAUSTED, f"the request body{size} exceeds the limit of {limit} bytes"
    )


def rest_peer(request: web.Request) -> str:
    """The request's peer as gRPC writes one: "unix:" for the REST unix socket (its mode and
    group are its access control), else "ipv4:ADDR" / "ipv6:[ADDR]" (the TCP peer itself, never
    a forwarded-for header)."""
    return transport_peer(request.transport)


def transport_peer(transport: Any) -> str:
    """rest_peer of a connection's transport."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return "unix:"
    return address_peer(transport.get_extra_info("peername") if transport is not None else None)


def address_peer(address: object) -> str:
    """A TCP socket address as gRPC writes a peer: "ipv4:ADDR" or "ipv6:[ADDR]"."""
    host = str(address[0]) if isinstance(address, tuple) and address else "unknown"
    return f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}"


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    """What the gRPC call carries: the caller's credentials, Grpc-Metadata-* headers, and that it
    came through REST (for metrics)."""
    metadata = [("x-opmas-transport", "rest")]
    for key, value in request.headers.items():
        lower = key.lower()
        if lower in _FORWARDED_HEADERS:
            metadata.append((lower, value))
        elif lower.startswith(_METADATA_PREFIX) and len(lower) > len(_METADATA_PREFIX):
            name = lower[len(_METADATA_PREFIX) :]
            # The credentials are the Authorization header's alone (the one checked before the
            # body was read), and grpc-* and x-opmas-* keys are the transport's, not a caller's.
            if name not in _FORWARDED_HEADERS and not name.startswith(_RESERVED_METADATA):
                metadata.append((name, value))
    return metadata


def _grpc_timeout(text: str) -> float | None:
    """The Grpc-Timeout header ("5S", "200m", ...: at most 8 digits and a unit, as gRPC defines
    it), as grpc-gateway honours it; None when absent or not of that form."""
    if not _TIMEOUT.fullmatch(text):
        return None
    return int(text[:-1]) * _TIMEOUT_UNITS[text[-1]]


def _status_of(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The call's google.rpc.Status, details included when the server sent them."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == exc.code().value[0]:
                return status
    return status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")
