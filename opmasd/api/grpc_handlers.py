"""AgentService's method handlers, with requests that cannot be decoded answered INVALID_ARGUMENT.

grpcio answers a request its deserializer cannot parse with UNKNOWN ("Unexpected DecodeError"),
before any code of ours runs: a truncated message, a field of the wrong wire type, a Struct
nested past protobuf's recursion limit. The handlers here are the generated ones but for their
deserializers, which hand such a request to the servicer as an Undecodable value; the
servicer's wrappers refuse it as a bad request, naming why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message of its type."""

    reason: str


def _lenient(parse: Callable[[bytes], Message]) -> Callable[[bytes], Message | Undecodable]:
    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return parse(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return Undecodable(str(exc)[:200] or type(exc).__name__)

    return deserialize


def method_handlers(service: ServiceDescriptor, servicer: Any) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's handlers by method name, each calling the servicer's method of that name."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        build = kinds[(bool(method.client_streaming), bool(method.server_streaming))]
        handlers[method.name] = build(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request.FromString),
            response_serializer=response.SerializeToString,
        )
    return handlers


def add_service(server: Any, service: ServiceDescriptor, servicer: Any) -> None:
    """Register the servicer on a grpc.aio server (or a LocalServer), as generated code does."""
    handlers = method_handlers(service, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
