"""The gate (api.auth) in front of every gRPC handler: the call's caller is established from
its metadata and peer, checked against the method's declared role, and kept for the handler
(api.auth.CURRENT_CALLER). REST calls pass through here too (the gateway calls the same
handlers in-process, with the HTTP peer as the call's peer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from opmasd.api.auth import CURRENT_CALLER, Gate
from opmasd.api.errors import to_grpc_status
from opmasd.api.local_calls import LocalContext
from opmasd.core.auth import Caller
from opmasd.core.errors import OpmasError

log = structlog.get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or self._gate.is_open(method):
            return handler
        authorization = _authorization(handler_call_details.invocation_metadata)
        gate = self._gate

        async def admitted(context: Context) -> Caller | None:
            """The caller, or None once the call is aborted."""
            entry_point = "rest" if isinstance(context, LocalContext) else "grpc"
            caller = gate.caller(authorization, context.peer(), entry_point)
            try:
                gate.check(caller, method)
            except OpmasError as exc:
                log.info(
                    "call refused",
                    method=method,
                    caller=caller.identity,
                    peer=caller.peer,
                    entry_point=entry_point,
                    reason=exc.message,
                )
                await context.abort_with_status(to_grpc_status(exc))
                return None
            return caller

        if handler.unary_unary is not None:
            inner: Callable[[Any, Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]  # grpc.aio handlers are coroutines

            async def unary(request: Any, context: Context) -> Any:
                caller = await admitted(context)
                reset = CURRENT_CALLER.set(caller)
                try:
                    return await inner(request, context)
                finally:
                    CURRENT_CALLER.reset(reset)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Callable[[Any, Context], AsyncIterator[Any]] = handler.unary_stream  # type: ignore[assignment]

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                caller = await admitted(context)
                messages = inner_stream(request, context)
                try:
                    while True:
                        # Set for each step, never reset: a reader may take each message in a
                        # task of its own (the REST gateway does), whose context is a copy that
                        # ends with that step; a token made in one such context cannot reset
                        # another.
                        CURRENT_CALLER.set(caller)
                        try:
                            message = await anext(messages)
                        except StopAsyncIteration:
                            return
                        yield message
                finally:
                    close = getattr(messages, "aclose", None)
                    if close is not None:  # what the handler holds (a log follow) ends now
                        await close()

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no method of ours takes a client stream


def _authorization(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""
