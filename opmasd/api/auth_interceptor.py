"""The gate (api.auth) in front of every gRPC handler: the call's caller is established from
its metadata and peer, checked against the method's declared role, and kept for the handler
(api.auth.CURRENT_CALLER). REST calls pass through here too (the gateway calls the same
handlers in-process, with the HTTP peer as the call's peer).

A request is parsed only once its caller is admitted (grpc is handed no deserializer), so a
refused call costs no parsing of its up to 4 MiB; a caller refused for want of credentials is
answered at its host's pace (Gate.pace_refusal), which keeps a flood from costing the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from opmasd.api.audit_records import Auditor, parameters_of
from opmasd.api.auth import CURRENT_CALLER, Gate
from opmasd.api.errors import code_name, to_grpc_status
from opmasd.api.local_calls import LocalContext
from opmasd.api.tcp_front import network_peer
from opmasd.core.auth import Caller, Role
from opmasd.core.errors import OpmasError, Unauthenticated

log = structlog.get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        gate: Gate,
        auditor: Auditor | None = None,
        local_role: Role = Role.ADMIN,
        relayed: bool = False,
    ) -> None:
        """auditor: where calls that change something, and refusals, are recorded (None: not
        recorded; tests of the gate alone). local_role: what a caller on the server's unix
        socket is (an admin; a viewer on the viewers' socket). relayed: the server's calls come
        from the TCP front (api.tcp_front), which names the network peer in its own."""
        self._gate = gate
        self._auditor = auditor
        self._local_role = local_role
        self._peer_of = network_peer if relayed else _as_is

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or self._gate.is_open(method):
            return handler
        authorization = _authorization(handler_call_details.invocation_metadata)
        gate, auditor, local_role, peer_of = self._gate, self._auditor, self._local_role, self._peer_of
        deserialize = handler.request_deserializer

        def parsed(request: Any) -> Any:
            """grpc hands over the bytes (in-process callers, the message itself)."""
            return deserialize(request) if deserialize is not None and isinstance(request, bytes) else request

        async def admitted(context: Context, raw: Any) -> Caller | None:
            """The caller, or None once the call is aborted."""
            entry_point = "rest" if isinstance(context, LocalContext) else "grpc"
            caller = gate.caller(authorization, peer_of(context.peer()), entry_point, local_role)
            try:
                gate.check(caller, method)
            except OpmasError as exc:
                # Not logged one by one (a flood would fill the log): the trail folds a burst
                # of refusals into one record and one log line.
                if auditor is not None:
                    auditor.refused(caller, method, code_name(exc), exc.message)
                await gate.pace_refusal(caller, len(raw) if isinstance(raw, bytes) else 0)
                await context.abort_with_status(to_grpc_status(exc))
                return None
            return caller

        async def still_admitted(caller: Caller, context: Context) -> bool:
            """Before each message of a stream: its token may have been revoked, or have
            expired, since the stream began (verify reads memory only: it costs a hash)."""
            now = gate.caller(authorization, caller.peer, caller.entry_point, local_role)
            if now.role == caller.role:
                return True
            exc = Unauthenticated("the stream's token was revoked or has expired")
            await context.abort_with_status(to_grpc_status(exc))
            return False

        if handler.unary_unary is not None:
            inner: Callable[[Any, Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]  # grpc.aio handlers are coroutines

            async def unary(raw: Any, context: Context) -> Any:
                caller = await admitted(context, raw)
                assert caller is not None  # abort_with_status raised otherwise
                request = parsed(raw)
                reset = CURRENT_CALLER.set(caller)
                result, message = "OK", ""
                try:
                    return await inner(request, context)
                except asyncio.CancelledError:
                    result, message = "CANCELLED", "the caller left before the answer"
                    raise
                except BaseException:
                    code = context.code()
                    result = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                    message = context.details() or ""
                    raise
                finally:
                    CURRENT_CALLER.reset(reset)
                    if auditor is not None and auditor.audited(method):
                        _audit(auditor, caller, method, request, result, message)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Callable[[Any, Context], AsyncIterator[Any]] = handler.unary_stream  # type: ignore[assignment]

            async def stream(raw: Any, context: Context) -> AsyncIterator[Any]:
                caller = await admitted(context, raw)
                assert caller is not None  # abort_with_status raised otherwise
                messages = inner_stream(parsed(raw), context)
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
                        if not await still_admitted(caller, context):
                            return
                        yield message
                finally:
                    close = getattr(messages, "aclose", None)
                    if close is not None:  # what the handler holds (a log follow) ends now
                        await close()

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=None, response_serializer=handler.response_serializer
            )
        return handler  # no method of ours takes a client stream


def _as_is(peer: str) -> str:
    return peer


def _authorization(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def _audit(auditor: Auditor, caller: Caller, method: str, request: Any, result: str, message: str) -> None:
    """Record the call; a failure to record is logged, never the call's failure (it is answered)."""
    try:
        auditor.answered(caller, method, parameters_of(request), result, message)
    except Exception:
        log.exception(
            "a call could not be recorded in the audit trail", method=method, caller=caller.identity
        )
