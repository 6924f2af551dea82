"""The `opmasctl agents ...` commands: one function each, from parsed arguments to output.

Each returns the exit status. gRPC errors propagate to cli.run, which reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf import field_mask_pb2, message

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl import views
from opmasctl.output import dump, dump_item, message_to_dict, plain_numbers, write
from opmasctl.parsing import enum_choices, parse_params, parse_seconds
from opmasctl.spec import SpecError, build_spec, environment_patch

STATES = enum_choices(agents_pb2.AgentState.items(), "AGENT_STATE_")
PAGE_SIZE = 500

M = TypeVar("M", bound=message.Message)
M_co = TypeVar("M_co", bound=message.Message, covariant=True)


class UsageError(Exception):
    """Arguments argparse accepted but that make no sense together; exit status 2."""


@dataclass
class Context:
    stub: agents_pb2_grpc.AgentServiceStub
    fmt: str
    # Deadline of one unary call in seconds; None waits forever.
    timeout: float | None
    # Arguments after a bare `--` (register/update take them as the agent's command).
    rest: list[str]

    def emit(self, msg: message.Message, human: str) -> None:
        write(human if self.fmt == "table" else dump(message_to_dict(msg), self.fmt))

    def longer(self, extra: float | None) -> float | None:
        """The call deadline stretched by a server-side wait the request itself asks for."""
        if self.timeout is None or extra is None or extra <= 0:
            return self.timeout
        return self.timeout + extra


def _list_all(
    ctx: Context, state: str | None = None, type_: str = "", node: str = ""
) -> list[agents_pb2.Agent]:
    request = agents_pb2.ListAgentsRequest(
        state=STATES[state] if state else agents_pb2.AGENT_STATE_UNSPECIFIED,
        type=type_,
        node=node,
        page_size=PAGE_SIZE,
    )
    agents: list[agents_pb2.Agent] = []
    seen_tokens: set[str] = set()
    while True:
        response = ctx.stub.ListAgents(request, timeout=ctx.timeout)
        agents.extend(response.agents)
        token = response.next_page_token
        # A token seen before would loop forever; a well-behaved server never repeats one.
        if not token or token in seen_tokens:
            return agents
        seen_tokens.add(token)
        request.page_token = token


def agents_list(ctx: Context, args: argparse.Namespace) -> int:
    agents = _list_all(ctx, args.state, args.type or "", args.node or "")
    if ctx.fmt == "table":
        write(views.agents_table(agents))
    else:
        write(dump([message_to_dict(agent) for agent in agents], ctx.fmt))
    return 0


def agents_get(ctx: Context, args: argparse.Namespace) -> int:
    agent = ctx.stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=args.agent_id), timeout=ctx.timeout)
    ctx.emit(agent, views.agent_view(agent))
    return 0


def agents_status(ctx: Context, args: argparse.Namespace) -> int:
    if args.agent_id:
        status = ctx.stub.GetAgentStatus(
            agents_pb2.GetAgentStatusRequest(agent_id=args.agent_id), timeout=ctx.timeout
        )
        ctx.emit(status, views.status_view(status))
        return 0
    agents = _list_all(ctx)
    if ctx.fmt == "table":
        write(views.agents_table(agents))
    else:
        write(dump([message_to_dict(agent.status) for agent in agents], ctx.fmt))
    return 0


def _pid(status: agents_pb2.AgentStatus) -> str:
    return f" (pid {status.pid})" if status.pid else ""


_OperationResponse = (
    agents_pb2.StartAgentResponse | agents_pb2.StopAgentResponse | agents_pb2.RestartAgentResponse
)


def _report(ctx: Context, response: _OperationResponse, requested_id: str, done: str, unchanged: str) -> int:
    """Print what start/stop/restart did: `done` or, when nothing changed, the server's message
    (else `unchanged`); both are formats with {id} and {pid}."""
    names = {"id": response.status.agent_id or requested_id, "pid": _pid(response.status)}
    line = done.format(**names) if response.changed else (response.message or unchanged.format(**names))
    ctx.emit(response, line + "\n")
    return 0


def agents_start(ctx: Context, args: argparse.Namespace) -> int:
    response = ctx.stub.StartAgent(agents_pb2.StartAgentRequest(agent_id=args.agent_id), timeout=ctx.timeout)
    return _report(
        ctx, response, args.agent_id, "agent {id} started{pid}", "agent {id} is already running{pid}"
    )


def _stop_wait(ctx: Context, agent_id: str) -> float | None:
    """How long a stop of the agent may take on the server: its stop_timeout (SIGTERM, then the
    wait, then SIGKILL). The call deadline must outlast it, or a slow agent reads as a failure."""
    if ctx.timeout is None:
        return None
    agent = ctx.stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id), timeout=ctx.timeout)
    return agent.spec.stop_timeout.ToNanoseconds() / 1e9


def agents_stop(ctx: Context, args: argparse.Namespace) -> int:
    request = agents_pb2.StopAgentRequest(agent_id=args.agent_id)
    if args.stop_timeout is not None:
        request.timeout.CopyFrom(args.stop_timeout)
        extra: float | None = args.stop_timeout.ToNanoseconds() / 1e9
    else:
        extra = _stop_wait(ctx, args.agent_id)
    response = ctx.stub.StopAgent(request, timeout=ctx.longer(extra))
    return _report(ctx, response, args.agent_id, "agent {id} stopped", "agent {id} is already stopped")


def agents_restart(ctx: Context, args: argparse.Namespace) -> int:
    response = ctx.stub.RestartAgent(
        agents_pb2.RestartAgentRequest(agent_id=args.agent_id),
        timeout=ctx.longer(_stop_wait(ctx, args.agent_id)),
    )
    return _report(ctx, response, args.agent_id, "agent {id} restarted{pid}", "agent {id} was not restarted")


def _spec(ctx: Context, args: argparse.Namespace) -> tuple[agents_pb2.AgentSpec, list[str]]:
    try:
        return build_spec(args, ctx.rest)
    except SpecError as err:
        raise UsageError(str(err)) from None


def agents_register(ctx: Context, args: argparse.Namespace) -> int:
    spec, paths = _spec(ctx, args)
    request = agents_pb2.CreateAgentRequest(agent_id=args.id or "", start=args.start)
    if args.manifest is not None:
        if paths:
            raise UsageError("--manifest cannot be combined with spec flags or a command")
        # The daemon opens the file, and its working directory is not ours.
        request.manifest_path = os.path.abspath(os.path.expanduser(args.manifest))
    else:
        if "name" not in paths or "command" not in paths:
            raise UsageError("give --manifest PATH, or --name NAME and a command (--command CMD or after --)")
        request.spec.CopyFrom(spec)
    agent = ctx.stub.CreateAgent(request, timeout=ctx.timeout)
    line = f"agent {agent.agent_id} registered"
    if args.start:
        line += f" and started{_pid(agent.status)}"
    ctx.emit(agent, line + "\n")
    return 0


def agents_update(ctx: Context, args: argparse.Namespace) -> int:
    spec, paths = _spec(ctx, args)
    if not paths:
        raise UsageError("nothing to update: give at least one spec flag")
    patch = environment_patch(args)
    if patch is not None:
        # --env and --unset-env edit the environment the agent has (as kubectl set env does):
        # the whole map goes back, with these variables set and those removed.
        sets, unsets = patch
        current = ctx.stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=args.agent_id), timeout=ctx.timeout)
        merged = {**current.spec.environment, **sets}
        for key in unsets:
            merged.pop(key, None)
        spec.environment.clear()
        spec.environment.update(merged)
    request = agents_pb2.UpdateAgentRequest(
        agent_id=args.agent_id, spec=spec, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    agent = ctx.stub.UpdateAgent(request, timeout=ctx.timeout)
    line = f"agent {agent.agent_id or args.agent_id} updated ({', '.join(paths)})"
    if agent.status.pid:
        line += "; it runs with the previous spec until restarted"
    ctx.emit(agent, line + "\n")
    return 0


def agents_delete(ctx: Context, args: argparse.Namespace) -> int:
    response = ctx.stub.DeleteAgent(
        agents_pb2.DeleteAgentRequest(agent_id=args.agent_id), timeout=ctx.timeout
    )
    agent_id = response.agent_id or args.agent_id
    if response.deleted:
        line = f"agent {agent_id} deleted"
    else:
        line = response.message or f"agent {agent_id} was already deleted"
    ctx.emit(response, line + "\n")
    return 0


class _Stream(Protocol[M_co]):
    """A server-streaming call: iterable, and cancellable (grpc's _CallIterator is type-check only)."""

    def __iter__(self) -> Iterator[M_co]: ...

    def cancel(self) -> bool: ...


def _follow(stream: _Stream[M], render: Callable[[M], str]) -> int:
    """Writes each streamed message as it arrives. Ctrl-C cancels the call and exits 130; the
    daemon going away is an error (UNAVAILABLE), reported by the caller, never a quiet end."""
    try:
        for item in stream:
            write(render(item))
    except KeyboardInterrupt:
        # Tells the server at once instead of leaving it streaming to a dead reader.
        stream.cancel()
        return 130
    return 0


def _stream_render(ctx: Context, human: Callable[[M], str]) -> Callable[[M], str]:
    if ctx.fmt == "table":
        return human
    return lambda msg: dump_item(message_to_dict(msg), ctx.fmt)


def _log_line(line: agents_pb2.LogLine, timestamps: bool = False) -> str:
    """The text as the agent wrote it; a line of its stderr begins with `[err] `."""
    text = line.line.removesuffix("\n") + "\n"
    if line.stream == agents_pb2.LOG_STREAM_STDERR:
        text = "[err] " + text
    if timestamps:
        when = line.time.ToJsonString() if line.HasField("time") else "-"
        text = f"{when} {text}"
    return text


def agents_logs(ctx: Context, args: argparse.Namespace) -> int:
    request = agents_pb2.GetAgentLogsRequest(agent_id=args.agent_id, tail_lines=args.tail, follow=args.follow)
    stream = ctx.stub.GetAgentLogs(request, timeout=None if args.follow else ctx.timeout)
    timestamps = bool(args.timestamps)
    return _follow(stream, _stream_render(ctx, lambda line: _log_line(line, timestamps)))


def agents_watch(ctx: Context, args: argparse.Namespace) -> int:
    """The current state of what is watched first, then its changes. An id that is no agent
    fails at once (NOT_FOUND), as kubectl does, instead of a stream that never says anything."""
    for agent_id in args.agent_ids:
        ctx.stub.GetAgentStatus(agents_pb2.GetAgentStatusRequest(agent_id=agent_id), timeout=ctx.timeout)
    request = agents_pb2.WatchEventsRequest(agent_ids=args.agent_ids, initial_states=True)
    return _follow(ctx.stub.WatchEvents(request), _stream_render(ctx, views.event_line))


def agents_discover(ctx: Context, args: argparse.Namespace) -> int:
    response = ctx.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest(), timeout=ctx.timeout)
    ctx.emit(response, views.discover_view(response))
    return 0


def agents_metrics(ctx: Context, args: argparse.Namespace) -> int:
    metrics = ctx.stub.GetAgentMetrics(
        agents_pb2.GetAgentMetricsRequest(agent_id=args.agent_id), timeout=ctx.timeout
    )
    ctx.emit(metrics, views.metrics_view(metrics))
    return 0


def _result_text(result: Any) -> str:
    if result is None:
        return ""
    if isinstance(result, str):
        return result + "\n"
    return json.dumps(plain_numbers(result), indent=2, ensure_ascii=False) + "\n"


def agents_command(ctx: Context, args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.params or [])
    except ValueError as err:
        raise UsageError(str(err)) from None
    request = agents_pb2.SendCommandRequest(agent_id=args.agent_id, command=args.command, params=params)
    extra = None
    if args.command_timeout is not None:
        request.timeout.CopyFrom(args.command_timeout)
        extra = args.command_timeout.ToNanoseconds() / 1e9
    response = ctx.stub.SendCommand(request, timeout=ctx.longer(extra))
    failed = response.status == "error" or bool(response.error)
    if ctx.fmt != "table":
        write(dump(message_to_dict(response), ctx.fmt))
    elif failed:
        print(
            f"error: agent {args.agent_id} answered {args.command!r} with an error: {response.error or '-'}",
            file=sys.stderr,
        )
    else:
        result = message_to_dict(response.result) if response.HasField("result") else None
        write(_result_text(result) or f"{response.status or 'ok'}\n")
    return 1 if failed else 0


def positive_seconds(text: str) -> float:
    """A --timeout value for the whole call: 0 means no deadline; negative is refused."""
    seconds = parse_seconds(text)
    if seconds < 0:
        raise ValueError(f"invalid timeout {text!r}: must not be negative")
    return seconds
