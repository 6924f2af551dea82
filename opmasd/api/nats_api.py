"""The manager's NATS API: {p}.manager.command and {p}.manager.query (DESIGN §5).

A request is a §5 command ({"command", "agent_id", "params", "timestamp"}); the reply is a §5
response, with a machine-readable "code" (the gRPC code names) on errors. Every command maps
to the same manager method the gRPC API calls; nothing else happens here. The query subject
takes only the read-only commands. Each answered request is also published on
{p}.manager.response for listeners; requests too broken to understand are not.

The endpoints are registered as the NATS micro service "opmasd", so `$SRV.PING`,
`$SRV.INFO.opmasd` and `$SRV.STATS.opmasd` find them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

import opmasd
from opmasd.api.errors import code_name
from opmasd.bus import codec
from opmasd.bus.burst import BurstLog
from opmasd.bus.connection import NatsBus
from opmasd.bus.micro import ServiceDescription, ServiceEndpoint
from opmasd.bus.registration import Registration
from opmasd.bus.subjects import Subjects
from opmasd.core import errors
from opmasd.core.clock import utcnow
from opmasd.core.errors import BusUnavailable
from opmasd.core.messages import CommandReply
from opmasd.core.model import AgentRecord, AgentState
from opmasd.manager.operations import AgentFilter, AgentManager, OperationResult

log = structlog.get_logger(__name__)

# Manager requests are small; a bigger one is refused before any parsing.
MAX_REQUEST_BYTES = 64 * 1024

# The agent answered a forwarded command with an error of its own.
AGENT_ERROR = "AGENT_ERROR"


class _BadRequest(errors.InvalidArgument):
    """The request itself is wrong (not the manager's verdict on it): counted as malformed."""


# -- the one agent → JSON converter -------------------------------------------------------------


def _time(value: Any) -> str | None:
    return codec.format_timestamp(value) if value is not None else None


def agent_to_json(rec: AgentRecord, *, with_spec: bool = False) -> dict[str, Any]:
    running = rec.started_at is not None and rec.pid is not None
    out: dict[str, Any] = {
        "agent_id": rec.agent_id,
        "name": rec.spec.name,
        "type": rec.spec.type,
        "version": rec.spec.version,
        "node": rec.node,
        "state": rec.state.value,
        "desired_state": rec.desired.value,
        "state_reason": rec.state_reason,
        "state_changed_at": _time(rec.state_changed_at),
        "pid": rec.pid,
        "uptime_seconds": (
            round(max(0.0, (utcnow() - rec.started_at).total_seconds()), 3)
            if running and rec.started_at is not None
            else None
        ),
        "restart_count": rec.restart_count,
        "last_exit": (
            {
                "exit_code": rec.last_exit.exit_code,
                "signal": rec.last_exit.signal,
                "reason": rec.last_exit.reason,
                "time": _time(rec.last_exit.time),
            }
            if rec.last_exit is not None
            else None
        ),
        "last_heartbeat": _time(rec.last_heartbeat),
        "source": rec.source.value,
        "manifest_path": rec.manifest_path,
        "runtime": rec.spec.runtime.value,
    }
    if with_spec:
        out["spec"] = rec.spec.to_dict()
        out["created_at"] = _time(rec.created_at)
        out["updated_at"] = _time(rec.updated_at)
    return out


def _operation(result: OperationResult) -> dict[str, Any]:
    return {"changed": result.changed, "message": result.message, "agent": agent_to_json(result.record)}


# -- request parameters -------------------------------------------------------------------------


def _param_str(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRequest.single(f"params.{name}", "must be a string")
    return value


def _param_seconds(params: Mapping[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if not codec.is_finite_number(value):
        raise _BadRequest.single(f"params.{name}", "must be a number of seconds")
    return float(value)


def _require_agent_id(agent_id: str) -> str:
    if not agent_id:
        raise _BadRequest.single("agent_id", "missing: this command acts on one agent")
    return agent_id


# -- the API ------------------------------------------------------------------------------------

Handler = Callable[[str, Mapping[str, Any]], Awaitable[Any]]


class NatsManagerApi:
    def __init__(self, manager: AgentManager, bus: NatsBus, subjects: Subjects) -> None:
        self._manager = manager
        self._bus = bus
        self._subjects = subjects
        self._registration: Registration | None = None
        self._malformed = BurstLog("malformed manager request")
        self._commands: dict[str, Handler] = {
            "status": self._status,
            "list": self._list,
            "get": self._get,
            "start": self._start,
            "stop": self._stop,
            "restart": self._restart,
            "discover": self._discover,
            "delete": self._delete,
            "command": self._command,
        }
        self._queries = frozenset({"status", "list", "get"})

    async def start(self) -> None:
        """Serve both subjects (from the first moment the bus is connected)."""
        self._registration = await self._bus.add_service(
            ServiceDescription(
                name="opmasd",
                version=opmasd.__version__,
                description="OPMAS agent manager",
                metadata={"node": self._manager.settings.node, "subject_prefix": self._subjects.prefix},
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

    async def handle_command(self, data: bytes) -> bytes:
        return await self._handle(self._subjects.manager_command, data, query_only=False)

    async def handle_query(self, data: bytes) -> bytes:
        return await self._handle(self._subjects.manager_query, data, query_only=True)

    async def _handle(self, subject: str, data: bytes, *, query_only: bool) -> bytes:
        try:
            request = codec.decode_command(data, limit=MAX_REQUEST_BYTES)
        except codec.MalformedMessage as exc:
            self._malformed.record(subject, exc.reason, size=len(data))
            return codec.encode_response(
                codec.ERROR,
                error=f"malformed request: {exc.reason}",
                code="INVALID_ARGUMENT",
                extra=_violations_json([errors.FieldViolation("request", exc.reason)]),
            )
        name, agent_id = request.command, request.agent_id
        try:
            handler = self._commands.get(name)
            if handler is None:
                known = ", ".join(sorted(self._queries if query_only else self._commands))
                raise _BadRequest.single("command", f"unknown command {name[:64]!r}; known: {known}")
            if query_only and name not in self._queries:
                raise _BadRequest.single(
                    "command",
                    f"{name!r} changes state; send it to {self._subjects.manager_command}, "
                    f"this subject takes only {', '.join(sorted(self._queries))}",
                )
            result = await handler(agent_id, request.params)
            response = codec.encode_response(codec.SUCCESS, name, agent_id, result)
        except Exception as exc:
            if isinstance(exc, _BadRequest):
                self._malformed.record(subject, exc.message, command=name[:64])
            response = self._error_response(name, agent_id, exc)
        if len(response) > self._bus.max_payload:
            response = codec.encode_response(
                codec.ERROR,
                name,
                agent_id,
                error=f"the result is too large to send ({len(response)} bytes); narrow the request",
                code="RESOURCE_EXHAUSTED",
            )
        await self._broadcast(response)
        return response

    def _error_response(self, name: str, agent_id: str, exc: Exception) -> bytes:
        if isinstance(exc, CommandFailed):
            return codec.encode_response(
                codec.ERROR, name, agent_id, exc.reply.result, exc.reply.error, code=AGENT_ERROR
            )
        code = code_name(exc)
        if code == "INTERNAL":
            log.exception("unexpected error in NATS manager request", command=name[:64], agent_id=agent_id)
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        extra: dict[str, Any] = {}
        if isinstance(exc, errors.InvalidArgument):
            extra = _violations_json(exc.violations)
        if isinstance(exc, errors.NotFound | errors.AlreadyExists):
            extra = {"resource": {"type": exc.resource_type, "name": exc.name}}
        return codec.encode_response(codec.ERROR, name, agent_id, None, message, code=code, extra=extra)

    async def _broadcast(self, response: bytes) -> None:
        try:
            await self._bus.publish(self._subjects.manager_response, response)
        except (BusUnavailable, ValueError) as exc:
            # The requester still gets its reply when the connection is back; listeners miss it.
            log.debug("manager response not broadcast", error=str(exc))

    # -- commands: each calls one manager method ------------------------------------------------

    async def _status(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return agent_to_json(self._manager.get_agent(_require_agent_id(agent_id)))

    async def _get(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return agent_to_json(self._manager.get_agent(_require_agent_id(agent_id)), with_spec=True)

    async def _list(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        state_name = _param_str(params, "state")
        try:
            state = AgentState(state_name) if state_name else None
        except ValueError:
            known = ", ".join(s.value for s in AgentState)
            raise _BadRequest.single("params.state", f"{state_name[:32]!r} is not one of {known}") from None
        records = self._manager.list_agents(
            AgentFilter(state=state, type=_param_str(params, "type"), node=_param_str(params, "node"))
        )
        return {"agents": [agent_to_json(rec) for rec in records], "total": len(records)}

    async def _start(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return _operation(await self._manager.start_agent(_require_agent_id(agent_id)))

    async def _stop(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        timeout = _param_seconds(params, "timeout")
        return _operation(await self._manager.stop_agent(_require_agent_id(agent_id), timeout))

    async def _restart(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return _operation(await self._manager.restart_agent(_require_agent_id(agent_id)))

    async def _delete(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        rec, deleted = await self._manager.delete_agent(_require_agent_id(agent_id))
        message = f"agent {rec.agent_id} deleted" if deleted else f"agent {rec.agent_id} was already deleted"
        return {"agent_id": rec.agent_id, "deleted": deleted, "message": message}

    async def _discover(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        report = await self._manager.discover()
        return {
            "agents": [
                {"agent_id": a.agent_id, "name": a.name, "manifest_path": a.manifest_path, "new": a.new}
                for a in report.agents
            ],
            "errors": [{"manifest_path": str(e.path), "message": e.message} for e in report.errors],
        }

    async def _command(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        """params {command, params, timeout}: a custom command for the agent, its reply back."""
        _require_agent_id(agent_id)
        command = _param_str(params, "command")
        if not command:
            raise _BadRequest.single("params.command", "missing: the command to send to the agent")
        agent_params = params.get("params")
        if agent_params is None:
            agent_params = {}
        if not isinstance(agent_params, dict):
            raise _BadRequest.single("params.params", "must be an object")
        # The manager checks the timeout's range and applies its default when it is absent.
        reply = await self._manager.send_command(
            agent_id, command, agent_params, _param_seconds(params, "timeout")
        )
        if reply.status != codec.SUCCESS:
            raise CommandFailed(reply)
        return reply.result


class CommandFailed(Exception):
    """The agent answered, with an error: passed on as an AGENT_ERROR response."""

    def __init__(self, reply: CommandReply) -> None:
        super().__init__(reply.error)
        self.reply = reply


def _violations_json(violations: list[errors.FieldViolation]) -> dict[str, Any]:
    return {"violations": [{"field": v.field, "description": v.description} for v in violations]}


__all__ = ["CommandFailed", "NatsManagerApi", "agent_to_json"]
