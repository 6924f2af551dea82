"""The manager's subjects {p}.manager.command and .query, served as the NATS micro service "opmasd".

The wire half of the manager's NATS API (DESIGN §5): a request's §5 command JSON is decoded
strictly into a ManagerRequest and handed to one handler (api/nats_api.py, the dispatch
table); the ManagerReply it returns is written as §5 response JSON. Requests that cannot be
decoded, and those the handler marks malformed, are counted per subject and logged once per
burst. Each answered reply is also published on {p}.manager.response for listeners; requests
too broken to understand are not. `$SRV.PING`, `$SRV.INFO.opmasd` and `$SRV.STATS.opmasd`
find the service.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from google.rpc import code_pb2

from opmasd.bus import codec
from opmasd.bus.burst import BurstLog
from opmasd.bus.connection import NatsBus
from opmasd.bus.micro import ServiceDescription, ServiceEndpoint
from opmasd.bus.registration import Registration
from opmasd.core.errors import BusRejected, BusUnavailable, FieldViolation
from opmasd.core.messages import ERROR, ManagerReply, ManagerRequest

log = structlog.get_logger(__name__)

# The codes the bus itself answers with (a request it cannot read, a reply too large, a handler
# that broke its contract), named as google.rpc.Code names them; domain errors get theirs from
# the api's table (api/errors.py) through the handler's ManagerReply.
_INVALID_ARGUMENT = code_pb2.Code.Name(code_pb2.INVALID_ARGUMENT)
_RESOURCE_EXHAUSTED = code_pb2.Code.Name(code_pb2.RESOURCE_EXHAUSTED)
_INTERNAL = code_pb2.Code.Name(code_pb2.INTERNAL)

ManagerHandler = Callable[[ManagerRequest], Awaitable[ManagerReply]]
"""Answers one request; meant never to raise (every failure is an error reply)."""

SERVICE_NAME = "opmasd"
# Manager requests are small; a bigger one is refused before any parsing.
MAX_REQUEST_BYTES = 64 * 1024


class ManagerService:
    def __init__(self, bus: NatsBus, handler: ManagerHandler, *, node: str, version: str) -> None:
        self._bus = bus
        self._subjects = bus.subjects
        self._handler = handler
        self._node = node
        self._version = version
        self._registration: Registration | None = None
        self._malformed = BurstLog("malformed manager request")

    async def start(self) -> None:
        """Serve both subjects (from the first moment the bus is connected)."""
        self._registration = await self._bus.add_service(
            ServiceDescription(
                name=SERVICE_NAME,
                version=self._version,
                description="OPMAS agent manager",
                metadata={"node": self._node, "subject_prefix": self._subjects.prefix},
            ),
            [
                ServiceEndpoint("command", self._subjects.manager_command, self.handle_command),
                ServiceEndpoint("query", self._subjects.manager_query, self.handle_query),
            ],
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests; running ones get up to grace seconds."""
        if self._registration is not None:
            await self._registration.stop(grace)
            self._registration = None
        self._malformed.close()

    def malformed_counts(self) -> dict[str, int]:
        return self._malformed.counts()

    async def handle_command(self, data: bytes, authorization: str = "") -> bytes:
        return await self._handle(self._subjects.manager_command, data, authorization, read_only=False)

    async def handle_query(self, data: bytes, authorization: str = "") -> bytes:
        return await self._handle(self._subjects.manager_query, data, authorization, read_only=True)

    async def _handle(self, subject: str, data: bytes, authorization: str, *, read_only: bool) -> bytes:
        try:
            message = codec.decode_command(data, limit=MAX_REQUEST_BYTES)
        except codec.MalformedMessage as exc:
            self._malformed.record(subject, exc.reason, size=len(data))
            return codec.encode_manager_reply(
                ManagerReply(
                    ERROR,
                    error=f"malformed request: {exc.reason}",
                    code=_INVALID_ARGUMENT,
                    violations=(FieldViolation("request", exc.reason),),
                )
            )
        request = ManagerRequest(message.command, message.agent_id, message.params, read_only, authorization)
        response = await self._answer(subject, request)
        if len(response) > self._bus.max_payload:
            response = codec.encode_manager_reply(
                ManagerReply(
                    ERROR,
                    request.command,
                    request.agent_id,
                    error=f"the result is too large to send ({len(response)} bytes); narrow the request",
                    code=_RESOURCE_EXHAUSTED,
                )
            )
        await self._broadcast(response)
        return response

    async def _answer(self, subject: str, request: ManagerRequest) -> bytes:
        try:
            reply = await self._handler(request)
            if reply.malformed:
                self._malformed.record(subject, reply.error, command=request.command[:64])
            return codec.encode_manager_reply(reply)
        except Exception as exc:
            # The handler answers every failure itself; what reaches here is a bug in it or a
            # result that is not JSON-able. The requester still gets an answer, as INTERNAL.
            log.exception(
                "unexpected error in NATS manager request",
                command=request.command[:64],
                agent_id=request.agent_id,
            )
            return codec.encode_manager_reply(
                ManagerReply(
                    ERROR,
                    request.command,
                    request.agent_id,
                    error=str(exc) or type(exc).__name__,
                    code=_INTERNAL,
                )
            )

    async def _broadcast(self, response: bytes) -> None:
        try:
            await self._bus.publish(self._subjects.manager_response, response)
        except (BusUnavailable, BusRejected) as exc:
            # The requester still gets its reply when the connection is back; listeners miss it.
            log.debug("manager response not broadcast", error=str(exc))
