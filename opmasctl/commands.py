"""The `opmasctl agents ...` commands: one function each, from parsed arguments to output.

Each returns the exit status. gRPC errors propagate to cli.run, which reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, json_format, message

from opmas.v1 import agents_pb2, agents_pb2_grpc, audit_pb2_grpc, tokens_pb2_grpc
from opmasctl import views
from opmasctl.connection import Connection
from opmasctl.output import HUMAN_FORMATS, dump, dump_item, message_to_dict, plain_numbers, write
from opmasctl.parsing import enum_choices, parse_duration, parse_params, parse_seconds
from opmasctl.spec import SpecError, build_spec, map_patches
from opmasctl.tables import TableStyle

STATES = enum_choices(agents_pb2.AgentState.items(), "AGENT_STATE_")
PAGE_SIZE = 500

M = TypeVar("M", bound=message.Message)
M_co = TypeVar("M_co", bound=message.Message, covariant=True)


class UsageError(Exception):
    """Arguments argparse accepted but that make no sense together; exit status 2."""


@dataclass
class Context:
    # The daemon, looked for at the first call (`stub`), not before.
    connection: Connection
    # -o: table, wide, json, yaml or name.
    fmt: str
    # Deadline of one unary call in seconds; None waits forever.
    timeout: float | None
    # Arguments after a bare `--` (register/update take them as the agent's command).
    rest: list[str]
    # How tables are drawn: headers, -o wide's columns, the terminal's width, colour.
    style: TableStyle = field(default_factory=TableStyle)

    @property
    def stub(self) -> agents_pb2_grpc.AgentServiceStub:
        return self.connection.stub

    @property
    def tokens(self) -> tokens_pb2_grpc.TokenServiceStub:
        return self.connection.tokens

    @property
    def audit(self) -> audit_pb2_grpc.AuditServiceStub:
        return self.connection.audit

    @property
    def human(self) -> bool:
        return self.fmt in HUMAN_FORMATS

    def emit(self, msg: message.Message, human: str, ids: Sequence[str] = ()) -> None:
        """The result of a command: `human` for table/wide, the message's JSON or YAML (as the
        REST API writes it), or for -o name the ids of the agents it concerns, one a line."""
        if self.fmt == "name":
            write("".join(f"{agent_id}\n" for agent_id in ids))
        elif self.human:
            write(human)
        else:
            write(dump(message_to_dict(msg), self.fmt))

    def emit_item(self, msg: message.Message, human: str, ids: Sequence[str] = ()) -> None:
        """One of several results: as emit, but JSON as one line (NDJSON) and YAML as one
        document of a stream, so that the output of all of them still parses."""
        if self.fmt in ("json", "yaml"):
            write(dump_item(message_to_dict(msg), self.fmt))
        else:
            self.emit(msg, human, ids)

    def longer(self, extra: float | None) -> float | None:
        """The call deadline stretched by a server-side wait the request itself asks for."""
        if self.timeout is None or extra is None or extra <= 0:
            return self.timeout
        return self.timeout + extra


def list_agents(
    ctx: Context, state: str | None = None, type_: str = "", node: str = "", selector: str = ""
) -> list[agents_pb2.Agent]:
    """Every agent the filter matches, all pages of ListAgents."""
    request = agents_pb2.ListAgentsRequest(
        state=STATES[state] if state else agents_pb2.AGENT_STATE_UNSPECIFIED,
        type=type_,
        node=node,
        page_size=PAGE_SIZE,
        label_selector=selector,
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


def _emit_agents(ctx: Context, agents: list[agents_pb2.Agent]) -> None:
    """A list of agents: the table, or the ListAgentsResponse the API would give for all of
    them in one page (the pages merged: no nextPageToken, totalSize counts them)."""
    if ctx.human and not agents:
        # On stderr, as kubectl's "No resources found": stdout holds only the table, here none.
        print("no agents", file=sys.stderr)
        return
    merged = agents_pb2.ListAgentsResponse(agents=agents, total_size=len(agents))
    ctx.emit(merged, views.agents_table(agents, ctx.style), [agent.agent_id for agent in agents])


def agents_list(ctx: Context, args: argparse.Namespace) -> int:
    _emit_agents(ctx, list_agents(ctx, args.state, args.type or "", args.node or "", args.selector or ""))
    return 0


def agents_get(ctx: Context, args: argparse.Namespace) -> int:
    agent = ctx.stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=args.agent_id), timeout=ctx.timeout)
    ctx.emit(agent, views.agent_view(agent), [agent.agent_id])
    return 0


def agents_status(ctx: Context, args: argparse.Namespace) -> int:
    if args.agent_id and args.selector is not None:
        raise UsageError("give an agent id or -l SELECTOR, not both")
    if args.agent_id:
        status = ctx.stub.GetAgentStatus(
            agents_pb2.GetAgentStatusRequest(agent_id=args.agent_id), timeout=ctx.timeout
        )
        ctx.emit(status, views.status_view(status), [status.agent_id or args.agent_id])
        return 0
    # Every agent's status: the API's list, as `agents list` gives it (-o json: ListAgentsResponse).
    _emit_agents(ctx, list_agents(ctx, selector=args.selector or ""))
    return 0


def pid_text(status: agents_pb2.AgentStatus) -> str:
    return f" (pid {status.pid})" if status.pid else ""


_OperationResponse = (
    agents_pb2.StartAgentResponse | agents_pb2.StopAgentResponse | agents_pb2.RestartAgentResponse
)


def _report(ctx: Context, response: _OperationResponse, requested_id: str, done: str, unchanged: str) -> int:
    """Print what start/stop/restart did: `done` or, when nothing changed, the server's message
    (else `unchanged`); both are formats with {id} and {pid}."""
    names = {"id": response.status.agent_id or requested_id, "pid": pid_text(response.status)}
    line = done.format(**names) if response.changed else (response.message or unchanged.format(**names))
    ctx.emit(response, line + "\n", [names["id"]])
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
    if args.grace is not None:
        # --grace: SIGTERM, this long, then SIGKILL (instead of the agent's stop_timeout).
        request.timeout.CopyFrom(args.grace)
        extra: float | None = args.grace.ToNanoseconds() / 1e9
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
        line += f" and started{pid_text(agent.status)}"
    ctx.emit(agent, line + "\n", [agent.agent_id])
    return 0


def agents_update(ctx: Context, args: argparse.Namespace) -> int:
    spec, paths = _spec(ctx, args)
    if not paths:
        raise UsageError("nothing to update: give at least one spec flag")
    # --env/--unset-env and --label/--unset-label edit the map the agent has (as kubectl set env
    # and kubectl label do): the whole map goes back, with these keys set and those removed.
    patches = map_patches(args)
    if patches:
        current = ctx.stub.GetAgent(agents_pb2.GetAgentRequest(agent_id=args.agent_id), timeout=ctx.timeout)
        for field, sets, unsets in patches:
            merged = {**getattr(current.spec, field), **sets}
            for key in unsets:
                merged.pop(key, None)
            getattr(spec, field).clear()
            getattr(spec, field).update(merged)
    request = agents_pb2.UpdateAgentRequest(
        agent_id=args.agent_id, spec=spec, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    agent = ctx.stub.UpdateAgent(request, timeout=ctx.timeout)
    line = f"agent {agent.agent_id or args.agent_id} updated ({', '.join(paths)})"
    if agent.status.pid:
        line += "; it runs with the previous spec until restarted"
    ctx.emit(agent, line + "\n", [agent.agent_id or args.agent_id])
    return 0


def agents_delete(ctx: Context, args: argparse.Namespace) -> int:
    try:
        extra = _stop_wait(ctx, args.agent_id)
    except grpc.RpcError as err:
        # Deleted already (or never there): the delete itself says which, as it always did.
        if not (isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.NOT_FOUND):
            raise
        extra = None
    response = ctx.stub.DeleteAgent(
        agents_pb2.DeleteAgentRequest(agent_id=args.agent_id), timeout=ctx.longer(extra)
    )
    agent_id = response.agent_id or args.agent_id
    if response.deleted:
        line = f"agent {agent_id} deleted"
    else:
        line = response.message or f"agent {agent_id} was already deleted"
    ctx.emit(response, line + "\n", [agent_id])
    return 0


class Stream(Protocol[M_co]):
    """A server-streaming call: iterable, and cancellable (grpc's _CallIterator is type-check only)."""

    def __iter__(self) -> Iterator[M_co]: ...

    def cancel(self) -> bool: ...


def follow(stream: Stream[M], render: Callable[[M], str]) -> int:
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


def stream_render(
    ctx: Context, human: Callable[[M], str], name: Callable[[M], str] | None = None
) -> Callable[[M], str]:
    """Each streamed message as its own line (NDJSON) or YAML document, -o name's id, or human."""
    if ctx.fmt == "name" and name is not None:
        return lambda msg: name(msg) + "\n"
    if ctx.human:
        return human
    return lambda msg: dump_item(message_to_dict(msg), ctx.fmt)


def agents_watch(ctx: Context, args: argparse.Namespace) -> int:
    """The current state of what is watched first, then its changes. An id that is no agent
    fails at once (NOT_FOUND), as kubectl does, instead of a stream that never says anything."""
    for agent_id in args.agent_ids:
        ctx.stub.GetAgentStatus(agents_pb2.GetAgentStatusRequest(agent_id=agent_id), timeout=ctx.timeout)
    request = agents_pb2.WatchEventsRequest(agent_ids=args.agent_ids, initial_states=True)
    render = stream_render(ctx, views.event_line, lambda event: event.agent_id)
    return follow(ctx.stub.WatchEvents(request), render)


def agents_discover(ctx: Context, args: argparse.Namespace) -> int:
    response = ctx.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest(), timeout=ctx.timeout)
    ctx.emit(
        response, views.discover_view(response, ctx.style), [found.agent_id for found in response.agents]
    )
    return 0


def agents_metrics(ctx: Context, args: argparse.Namespace) -> int:
    metrics = ctx.stub.GetAgentMetrics(
        agents_pb2.GetAgentMetricsRequest(agent_id=args.agent_id), timeout=ctx.timeout
    )
    ctx.emit(metrics, views.metrics_view(metrics), [metrics.agent_id or args.agent_id])
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
    if args.reply_timeout is not None:
        # How long the daemon waits for the agent's answer; the call's deadline covers it too.
        request.timeout.CopyFrom(args.reply_timeout)
        extra = args.reply_timeout.ToNanoseconds() / 1e9
    response = ctx.stub.SendCommand(request, timeout=ctx.longer(extra))
    failed = response.status == "error" or bool(response.error)
    if not ctx.human:
        write(dump(message_to_dict(response), ctx.fmt))
    elif failed:
        print(
            f"error: agent {args.agent_id} answered {args.command!r} with an error: {response.error or '-'}",
            file=sys.stderr,
        )
    else:
        result = json_format.MessageToDict(response.result) if response.HasField("result") else None
        write(_result_text(result) or f"{response.status or 'ok'}\n")
    return 1 if failed else 0


# A call deadline past this is refused rather than overflowing gRPC's own (a week).
MAX_CALL_TIMEOUT = 7 * 86400.0
# The daemon's bound on a stop's grace (and on a spec's stop_timeout): a day.
MAX_GRACE = 86400.0


def positive_seconds(text: str) -> float:
    """A --timeout value for the whole call: 0 means no deadline; negative is refused."""
    seconds = parse_seconds(text)
    if not 0 <= seconds <= MAX_CALL_TIMEOUT:
        raise ValueError(f"invalid timeout {text!r}: must be between 0 and {MAX_CALL_TIMEOUT:g} seconds")
    return seconds


def grace(text: str) -> duration_pb2.Duration:
    """--grace: the wait between SIGTERM and SIGKILL, up to the daemon's bound (a day)."""
    seconds = parse_seconds(text)
    if not 0 <= seconds <= MAX_GRACE:
        raise ValueError(f"invalid grace {text!r}: must be between 0 and {MAX_GRACE:g} seconds (a day)")
    return parse_duration(text)
