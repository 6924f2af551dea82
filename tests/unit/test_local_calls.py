"""In-process calls to gRPC handlers: the same interceptors, the errors a remote caller would get."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from opmasd.api.local_calls import LocalServer


class Recording(grpc.aio.ServerInterceptor):
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.seen.append(f"{self.name}:{details.method}:{dict(details.invocation_metadata).get('who')}")
        return await continuation(details)


def server(seen: list[str]) -> LocalServer:
    async def echo(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
        if request.value == "abort":
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "no such thing", (("grpc-status-details-bin", b"x"),)
            )
        if request.value == "slow":
            await asyncio.sleep(5)
        if request.value == "code":
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("set, not raised")
        if request.value == "boom":
            raise RuntimeError("a bug")
        return wrappers_pb2.StringValue(value=request.value.upper())

    async def count(request: wrappers_pb2.Int32Value, context: Any) -> AsyncIterator[wrappers_pb2.Int32Value]:
        for n in range(request.value):
            yield wrappers_pb2.Int32Value(value=n)
        if request.value == 2:
            await context.abort(grpc.StatusCode.ABORTED, "stopped at two")

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    local = LocalServer([Recording("outer", seen), Recording("inner", seen)])
    local.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
    return local


async def test_a_call_meets_every_interceptor_in_order_and_gets_the_response() -> None:
    seen: list[str] = []
    call = server(seen).channel().unary_unary("/t.T/Echo")
    reply = await call(wrappers_pb2.StringValue(value="hi"), metadata=[("who", "rest")])
    assert reply.value == "HI"
    assert seen == ["outer:/t.T/Echo:rest", "inner:/t.T/Echo:rest"]


@pytest.mark.parametrize(
    ("value", "code", "details"),
    [
        ("abort", grpc.StatusCode.NOT_FOUND, "no such thing"),
        ("code", grpc.StatusCode.FAILED_PRECONDITION, "set, not raised"),
        ("boom", grpc.StatusCode.UNKNOWN, "a bug"),
    ],
)
async def test_errors_are_what_a_remote_caller_gets(value: str, code: grpc.StatusCode, details: str) -> None:
    call = server([]).channel().unary_unary("/t.T/Echo")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(wrappers_pb2.StringValue(value=value))
    assert raised.value.code() is code
    assert details in (raised.value.details() or "")
    if value == "abort":
        assert tuple(raised.value.trailing_metadata()) == (("grpc-status-details-bin", b"x"),)


async def test_a_deadline_and_an_unknown_method() -> None:
    channel = server([]).channel()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary("/t.T/Echo")(wrappers_pb2.StringValue(value="slow"), timeout=0.05)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary("/t.T/Nope")(wrappers_pb2.StringValue())
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_stream_yields_then_fails_with_its_status() -> None:
    stream = server([]).channel().unary_stream("/t.T/Count")
    assert [m.value async for m in stream(wrappers_pb2.Int32Value(value=3))] == [0, 1, 2]
    got: list[int] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for message in stream(wrappers_pb2.Int32Value(value=2)):
            got.append(message.value)
    assert got == [0, 1] and raised.value.code() is grpc.StatusCode.ABORTED
