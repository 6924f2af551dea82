"""Counting RPCs: a grpc.aio interceptor that times every call and records its method, code and transport.

It wraps all four handler kinds (FIELD-NOTES: a handler of another cardinality, or a streaming
handler that is not an async generator, breaks the call). The code recorded is the one the
client gets: OK for a normal return (or whatever `set_code` chose), the status of an abort
(`context.abort` / `abort_with_status` raise, and the context keeps the code), for any other
exception the code set before it or else UNKNOWN (grpc answers so), CANCELLED when the call's
task is cancelled (the client went away or its deadline passed). A stream's duration is its
whole life, first call to last message.

The transport is "rest" when the call carries `x-opmas-transport: rest` (the REST gateway calls
the servicer through a loopback channel and says so), "grpc" otherwise; only those two values
exist, so a client cannot grow the label set. Unknown methods (grpc answers UNIMPLEMENTED
before any handler) are not recorded: their names are the caller's to choose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

TRANSPORT_HEADER = "x-opmas-transport"
REST, GRPC = "rest", "grpc"

# (method, code, transport, seconds)
Recorder = Callable[[str, str, str, float], None]
if TYPE_CHECKING:  # generic only in the stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

_CODE_NAMES = {code: code.name for code in grpc.StatusCode}


def transport_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == TRANSPORT_HEADER:
            return REST if value == REST else GRPC
    return GRPC


def _code(context: Any, default: str) -> str:
    """The status code the context will send (set by set_code or an abort), else default."""
    try:
        code = context.code()
    except Exception:  # an experimental API: a context without it records the default
        return default
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return _CODE_NAMES[code]
    # Older grpcio kept the raw integer of the C core; StatusCode's value is (int, name).
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, record: Recorder) -> None:
        self._record = record
        # (method, transport) -> (the handler grpc resolved, our wrapper of it): method handlers
        # are resolved per call but are the same objects each time, so wrap each once.
        self._wrapped: dict[tuple[str, str], tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        transport = transport_of(handler_call_details.invocation_metadata)
        key = (method, transport)
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method, transport)
        self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, method: str, transport: str) -> Handler:
        kinds = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._timed_unary(handler.unary_unary, method, transport), **kinds
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._timed_unary(handler.stream_unary, method, transport), **kinds
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._timed_stream(handler.unary_stream, method, transport), **kinds
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._timed_stream(handler.stream_stream, method, transport), **kinds
            )
        return handler  # no behavior at all: nothing to time

    # A coroutine function and an async-generator function, never lambdas: grpc.aio looks at the
    # function's kind to decide how to run it (a plain function goes to a thread pool).

    def _timed_unary(
        self, behavior: Any, method: str, transport: str
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        record = self._record

        async def timed(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = await behavior(request, context)
                code = _code(context, "OK")
                return response
            except Exception:  # an abort (AbortError) or a failure: the context's code, else UNKNOWN
                code = _code(context, "UNKNOWN")
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                record(method, code, transport, time.perf_counter() - started)

        return timed

    def _timed_stream(
        self, behavior: Any, method: str, transport: str
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        record = self._record

        async def timed(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write (grpc_health's Watch does)
                    await result
                code = _code(context, "OK")
            except Exception:  # an abort (AbortError) or a failure: the context's code, else UNKNOWN
                code = _code(context, "UNKNOWN")
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                record(method, code, transport, time.perf_counter() - started)

        return timed
