"""Calling the daemon's own gRPC handlers in-process: the same servicers and interceptors, no socket.

The REST gateway calls the API through this rather than a loopback channel: a local round trip
through grpc's C core and its threads cost ~1.4 ms of CPU per call, several times the servicer's
own work. What a client's call meets is kept: the handler is resolved through the server's
generic handlers and then every interceptor the gRPC server has, in the same order; the
request and response are the messages themselves (the body limit bounds their size). A call
ends as a grpc.aio.AioRpcError with the code, details and trailing metadata (the
google.rpc.Status details) a remote caller would have received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import grpc
import structlog

log = structlog.get_logger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
# The peer of a call whose caller named none: not "unix:", so it holds no local admin rights.
NO_PEER = "local:rest-gateway"


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: Metadata


class _Aborted(Exception):
    """Raised by LocalContext.abort*, as grpc.aio's context raises to end the handler."""


class LocalContext:
    """The part of grpc.aio.ServicerContext that servicers and interceptors use."""

    def __init__(self, metadata: Metadata, timeout: float | None, peer: str = NO_PEER) -> None:
        self._metadata = tuple(metadata)
        self._peer = peer
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._cancelled = False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise _Aborted(details)

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        return None

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return self._peer

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._cancelled

    def error(self) -> grpc.aio.AioRpcError:
        """The error a remote caller would get for how this call ended."""
        code = self._code or grpc.StatusCode.UNKNOWN
        return grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*self._trailing),
            details=self._details,
        )


class LocalServer:
    """Collects what `add_*Servicer_to_server` registers, and resolves calls as grpc.aio does."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._interceptors = tuple(interceptors)

    # The two methods generated code calls on a server.
    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        pass  # the generic handler added beside them serves the same methods

    async def resolve(self, method: str, metadata: Metadata) -> Any:
        """The method's handler after every interceptor, or None for an unknown method."""
        details = _CallDetails(method, tuple(metadata))

        async def base(call: Any) -> Any:
            for handler in self._handlers:
                found = handler.service(call)
                if found is not None:
                    return found
            return None

        async def step(index: int, call: Any) -> Any:
            if index == len(self._interceptors):
                return await base(call)
            return await self._interceptors[index].intercept_service(lambda c: step(index + 1, c), call)

        return await step(0, details)

    def channel(self) -> LocalChannel:
        return LocalChannel(self)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _unimplemented(method: str) -> grpc.aio.AioRpcError:
    return _error(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {method}")


def _failed(method: str, exc: BaseException, context: LocalContext) -> grpc.aio.AioRpcError:
    if isinstance(exc, _Aborted):
        return context.error()
    if isinstance(exc, TimeoutError):
        return _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    # grpc answers an exception that escapes a handler with UNKNOWN; the servicer logs its own.
    log.error("in-process call failed", method=method, error=repr(exc))
    return _error(grpc.StatusCode.UNKNOWN, f"Unexpected error: {exc!r}")


class LocalChannel:
    """The subset of grpc.aio.Channel the REST gateway uses, over a LocalServer."""

    def __init__(self, server: LocalServer) -> None:
        self._server = server

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Awaitable[Any]]:
        server = self._server

        async def call(
            request: Any, metadata: Metadata = (), timeout: float | None = None, peer: str = NO_PEER
        ) -> Any:
            handler = await server.resolve(method, metadata)
            if handler is None or handler.unary_unary is None:
                raise _unimplemented(method)
            context = LocalContext(metadata, timeout, peer)
            try:
                response = await asyncio.wait_for(handler.unary_unary(request, context), timeout)
            except Exception as exc:
                raise _failed(method, exc, context) from None
            if context.code() not in (None, grpc.StatusCode.OK):
                raise context.error()
            return response

        return call

    def unary_stream(self, method: str, **_: Any) -> Callable[..., LocalStream]:
        server = self._server

        def call(
            request: Any, metadata: Metadata = (), timeout: float | None = None, peer: str = NO_PEER
        ) -> LocalStream:
            return LocalStream(server, method, request, metadata, timeout, peer)

        return call

    async def close(self) -> None:
        return None


class LocalStream:
    """A server-streaming call: iterate it for the messages; cancel() ends it."""

    def __init__(
        self,
        server: LocalServer,
        method: str,
        request: Any,
        metadata: Metadata,
        timeout: float | None,
        peer: str = NO_PEER,
    ) -> None:
        self._server = server
        self._peer = peer
        self._method = method
        self._request = request
        self._metadata = metadata
        self._timeout = timeout
        self._generator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        handler = await self._server.resolve(self._method, self._metadata)
        if handler is None or handler.unary_stream is None:
            raise _unimplemented(self._method)
        context = LocalContext(self._metadata, self._timeout, self._peer)
        generator = handler.unary_stream(self._request, context)
        self._generator = generator
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        try:
            while True:
                # Per message, not around the loop: each message may be read by another task.
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    message = await asyncio.wait_for(anext(generator), remaining)
                except StopAsyncIteration:
                    break
                yield message
        except Exception as exc:
            raise _failed(self._method, exc, context) from None
        finally:
            await generator.aclose()
        if context.code() not in (None, grpc.StatusCode.OK):
            raise context.error()

    def cancel(self) -> bool:
        # The gateway cancels by cancelling the task that iterates; nothing else holds resources.
        return True
