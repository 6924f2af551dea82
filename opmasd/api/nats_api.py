"""The manager's NATS API as a dispatch table: each §5 command name calls one manager method.

bus/manager_service.py serves {p}.manager.command and {p}.manager.query and hands each
decoded request here as a ManagerRequest; the answer goes back as a ManagerReply, with a
machine-readable code (the gRPC code names, api/errors.py) on errors. Every command maps to
the same manager method the gRPC API calls; nothing else happens here. Requests from the
query subject may run only the read-only commands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from opmasd.api.audit_records import REFUSALS, Auditor
from opmasd.api.auth import CURRENT_CALLER, HIDDEN, Gate, sees_secrets
from opmasd.api.errors import code_name, is_known
from opmasd.api.nats_convert import (
    BadRequest,
    agent_to_json,
    deletion_to_json,
    discovery_to_json,
    operation_to_json,
    param_seconds,
    param_str,
    require_agent_id,
)
from opmasd.core import errors
from opmasd.core.auth import Caller
from opmasd.core.labels import SelectorError, parse_selector
from opmasd.core.messages import ERROR, SUCCESS, CommandReply, ManagerReply, ManagerRequest
from opmasd.core.model import AgentState
from opmasd.manager import AgentFilter, AgentManager

log = structlog.get_logger(__name__)

# The agent answered a forwarded command with an error of its own.
AGENT_ERROR = "AGENT_ERROR"

Command = Callable[[str, Mapping[str, Any]], Awaitable[Any]]

# The RPC each command is, for the role it requires (api.auth: declared once, in the proto).
NATS_RPCS = {
    name: f"/opmas.v1.AgentService/{rpc}"
    for name, rpc in {
        "status": "GetAgentStatus",
        "list": "ListAgents",
        "get": "GetAgent",
        "start": "StartAgent",
        "stop": "StopAgent",
        "restart": "RestartAgent",
        "discover": "DiscoverAgents",
        "delete": "DeleteAgent",
        "command": "SendCommand",
    }.items()
}
# A NATS request's peer: the server does not tell who sent it (never "unix:", never an admin
# without a token).
NATS_PEER = "nats:"


class NatsManagerApi:
    def __init__(
        self, manager: AgentManager, command_subject: str, gate: Gate, auditor: Auditor | None = None
    ) -> None:
        """command_subject: where state-changing commands go, named when a query sends one.
        gate: who may run which command (each runs as the RPC of NATS_RPCS and needs its role).
        auditor: where the commands that change something, and refusals, are recorded."""
        self._manager = manager
        self._gate = gate
        self._auditor = auditor
        self._command_subject = command_subject
        self._commands: dict[str, Command] = {
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

    async def handle(self, request: ManagerRequest) -> ManagerReply:
        """The manager's answer to one request; never raises (a failure is an error reply)."""
        name, agent_id = request.command, request.agent_id
        caller: Caller | None = None
        try:
            command = self._commands.get(name)
            if command is None:
                known = ", ".join(sorted(self._queries if request.read_only else self._commands))
                raise BadRequest.single("command", f"unknown command {name[:64]!r}; known: {known}")
            if request.read_only and name not in self._queries:
                raise BadRequest.single(
                    "command",
                    f"{name!r} changes state; send it to {self._command_subject}, "
                    f"this subject takes only {', '.join(sorted(self._queries))}",
                )
            caller = self._gate.caller(request.authorization, NATS_PEER, "nats")
            self._gate.check(caller, NATS_RPCS[name])
        except Exception as exc:
            reply = self._error_reply(name, agent_id, exc)
            if self._auditor is not None and caller is not None and reply.code in REFUSALS:
                self._auditor.refused(caller, NATS_RPCS[name], reply.code, reply.error)
            return reply
        reset = CURRENT_CALLER.set(caller)
        try:
            reply = ManagerReply(SUCCESS, name, agent_id, await command(agent_id, request.params))
        except Exception as exc:
            reply = self._error_reply(name, agent_id, exc)
        finally:
            CURRENT_CALLER.reset(reset)
        if self._auditor is not None:
            parameters = {"agent_id": agent_id, **request.params} if agent_id else dict(request.params)
            result = "OK" if reply.status == SUCCESS else reply.code
            self._auditor.answered(caller, NATS_RPCS[name], parameters, result, reply.error)
        return reply

    def _error_reply(self, name: str, agent_id: str, exc: Exception) -> ManagerReply:
        if isinstance(exc, CommandFailed):
            return ManagerReply(ERROR, name, agent_id, exc.reply.result, exc.reply.error, code=AGENT_ERROR)
        code = code_name(exc)
        if not is_known(exc):
            log.exception("unexpected error in NATS manager request", command=name[:64], agent_id=agent_id)
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        violations = tuple(exc.violations) if isinstance(exc, errors.InvalidArgument) else None
        resource = None
        if isinstance(exc, errors.NotFound | errors.AlreadyExists):
            resource = (exc.resource_type, exc.name)
        return ManagerReply(
            ERROR,
            name,
            agent_id,
            error=message,
            code=code,
            violations=violations,
            resource=resource,
            malformed=isinstance(exc, BadRequest),
        )

    # -- commands: each calls one manager method ------------------------------------------------

    async def _status(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return agent_to_json(self._manager.get_agent(require_agent_id(agent_id)))

    async def _get(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        agent = agent_to_json(self._manager.get_agent(require_agent_id(agent_id)), with_spec=True)
        environment = agent["spec"].get("environment")
        if isinstance(environment, dict) and not sees_secrets():
            for name in environment:
                environment[name] = HIDDEN
        return agent

    async def _list(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        state_name = param_str(params, "state")
        try:
            state = AgentState(state_name) if state_name else None
        except ValueError:
            known = ", ".join(s.value for s in AgentState)
            raise BadRequest.single("params.state", f"{state_name[:32]!r} is not one of {known}") from None
        try:
            labels = parse_selector(param_str(params, "label_selector"))
        except SelectorError as exc:
            raise BadRequest.single("params.label_selector", str(exc)) from None
        records = self._manager.list_agents(
            AgentFilter(
                state=state, type=param_str(params, "type"), node=param_str(params, "node"), labels=labels
            )
        )
        return {"agents": [agent_to_json(rec) for rec in records], "total": len(records)}

    async def _start(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return operation_to_json(await self._manager.start_agent(require_agent_id(agent_id)))

    async def _stop(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        timeout = param_seconds(params, "timeout")
        return operation_to_json(await self._manager.stop_agent(require_agent_id(agent_id), timeout))

    async def _restart(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return operation_to_json(await self._manager.restart_agent(require_agent_id(agent_id)))

    async def _delete(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return deletion_to_json(await self._manager.delete_agent(require_agent_id(agent_id)))

    async def _discover(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        return discovery_to_json(await self._manager.discover())

    async def _command(self, agent_id: str, params: Mapping[str, Any]) -> Any:
        """params {command, params, timeout}: a custom command for the agent, its reply back."""
        require_agent_id(agent_id)
        command = param_str(params, "command")
        if not command:
            raise BadRequest.single("params.command", "missing: the command to send to the agent")
        agent_params = params.get("params")
        if agent_params is None:
            agent_params = {}
        if not isinstance(agent_params, dict):
            raise BadRequest.single("params.params", "must be an object")
        # The manager checks the timeout's range and applies its default when it is absent.
        reply = await self._manager.send_command(
            agent_id, command, agent_params, param_seconds(params, "timeout")
        )
        if reply.status != SUCCESS:
            raise CommandFailed(reply)
        return reply.result


class CommandFailed(Exception):
    """The agent answered, with an error: passed on as an AGENT_ERROR reply."""

    def __init__(self, reply: CommandReply) -> None:
        super().__init__(reply.error)
        self.reply = reply


__all__ = ["AGENT_ERROR", "CommandFailed", "NatsManagerApi"]
