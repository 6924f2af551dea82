"""start, stop, restart and delete of several agents: named, `--all`, or `-l SELECTOR`.

One id alone is the single-agent call, as before. Several ids, `--all` or a selector are one
bulk request (StartAgents, StopAgents, RestartAgents) that the daemon runs for every agent at
once and answers with a result per agent; delete, which has no bulk call, deletes each selected
agent concurrently. A line per agent either way: what was done on stdout, what failed on stderr;
the exit status is that of the first failure (README "Exit status"), 0 when none failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import grpc

# googleapis-common-protos ships no type information (as in cli.py).
from google.rpc import code_pb2  # type: ignore[import-untyped, unused-ignore]

from opmas.v1 import agents_pb2
from opmasctl import commands
from opmasctl.commands import Context, UsageError, list_agents, pid_text
from opmasctl.exits import EXIT_OK, exit_status, exit_status_of

Handler = Callable[[Context, argparse.Namespace], int]

_DONE = {"start": "started", "stop": "stopped", "restart": "restarted"}


def add_selection_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("agent_ids", metavar="ID", nargs="*", help=f"the agents to {verb}")
    everyone = (
        "every agent listed (one of another node fails: only its node deletes it)"
        if verb == "delete"
        else "every agent of the daemon's node"
    )
    parser.add_argument("--all", action="store_true", help=f"{verb} {everyone}")
    parser.add_argument(
        "-l",
        "--selector",
        metavar="SELECTOR",
        help=f"{verb} the agents whose labels match, e.g. env=prod,role!=probe (kubectl's syntax)",
    )


def is_bulk(args: argparse.Namespace) -> bool:
    """Whether the command names other than exactly one agent (a bulk request)."""
    ways = [bool(args.agent_ids), args.all, args.selector is not None]
    if sum(ways) != 1:
        raise UsageError("give agent ids, --all or -l SELECTOR (one of them)")
    if args.selector is not None and not args.selector.strip():
        raise UsageError("-l: the selector is empty (--all selects every agent)")
    return not (len(args.agent_ids) == 1)


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    return {"agent_ids": args.agent_ids, "label_selector": args.selector or "", "all": args.all}


def _longest_stop(ctx: Context, args: argparse.Namespace) -> float | None:
    """How long stopping the selected agents may take on the daemon: the longest stop_timeout
    among them (they stop at once). The call's deadline must outlast it."""
    if ctx.timeout is None:
        return None
    grace = getattr(args, "grace", None)
    if grace is not None:
        return float(grace.ToNanoseconds() / 1e9)
    agents = list_agents(ctx, selector=args.selector or "")
    wanted = set(args.agent_ids)
    waits = [a.spec.stop_timeout.ToNanoseconds() / 1e9 for a in agents if not wanted or a.agent_id in wanted]
    return max(waits, default=0.0)


def run_bulk(ctx: Context, args: argparse.Namespace, verb: str) -> int:
    """StartAgents, StopAgents or RestartAgents for the selection, reported per agent."""
    response: Any
    if verb == "start":
        response = ctx.stub.StartAgents(
            agents_pb2.StartAgentsRequest(**_selection(args)), timeout=ctx.timeout
        )
    elif verb == "stop":
        stop = agents_pb2.StopAgentsRequest(**_selection(args))
        if args.grace is not None:
            stop.timeout.CopyFrom(args.grace)
        response = ctx.stub.StopAgents(stop, timeout=ctx.longer(_longest_stop(ctx, args)))
    else:
        restart = agents_pb2.RestartAgentsRequest(**_selection(args))
        response = ctx.stub.RestartAgents(restart, timeout=ctx.longer(_longest_stop(ctx, args)))
    results: list[agents_pb2.AgentOperationResult] = list(response.results)
    done = [r for r in results if r.code == 0]
    failed = [r for r in results if r.code != 0]
    ctx.emit(response, "".join(_result_line(r, verb) for r in done), [r.agent_id for r in done])
    for result in failed:
        code = code_pb2.Code.Name(result.code).lower()
        print(f"error: agent {result.agent_id}: {code}: {result.message}", file=sys.stderr)
    if not results:
        print("no agents matched", file=sys.stderr)
    return exit_status_of(failed[0].code) if failed else EXIT_OK


def _result_line(result: agents_pb2.AgentOperationResult, verb: str) -> str:
    if result.changed:
        pid = pid_text(result.status) if verb != "stop" else ""
        return f"agent {result.agent_id} {_DONE[verb]}{pid}\n"
    return f"{result.message or f'agent {result.agent_id} unchanged'}\n"


def delete_many(ctx: Context, args: argparse.Namespace) -> int:
    """DeleteAgent for each selected agent, all of them in flight at once."""
    if args.agent_ids:
        agent_ids = sorted(set(args.agent_ids))
        stop_waits = {a.agent_id: a.spec.stop_timeout.ToNanoseconds() / 1e9 for a in list_agents(ctx)}
    else:
        agents = list_agents(ctx, selector=args.selector or "")
        agent_ids = [a.agent_id for a in agents]
        stop_waits = {a.agent_id: a.spec.stop_timeout.ToNanoseconds() / 1e9 for a in agents}
    calls = {
        agent_id: ctx.stub.DeleteAgent.future(
            agents_pb2.DeleteAgentRequest(agent_id=agent_id),
            timeout=ctx.longer(stop_waits.get(agent_id)),
        )
        for agent_id in agent_ids
    }
    first_failure: int | None = None
    for agent_id, call in calls.items():
        try:
            reply = call.result()
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            print(f"error: agent {agent_id}: {code.name.lower()}: {details}", file=sys.stderr)
            first_failure = first_failure if first_failure is not None else exit_status(code)
            continue
        if reply.deleted:
            line = f"agent {agent_id} deleted"
        else:
            line = reply.message or f"agent {agent_id} was already deleted"
        # No bulk message: JSON and YAML are a stream of DeleteAgentResponses, one per agent.
        ctx.emit_item(reply, line + "\n", [agent_id])
    if not calls:
        print("no agents matched", file=sys.stderr)
    return first_failure if first_failure is not None else EXIT_OK


def one_or_many(single: Handler, many: Handler) -> Handler:
    """The command for exactly one id (the single-agent call, as before), else the bulk one."""

    def handler(ctx: Context, args: argparse.Namespace) -> int:
        if is_bulk(args):
            return many(ctx, args)
        args.agent_id = args.agent_ids[0]
        return single(ctx, args)

    return handler


agents_start = one_or_many(commands.agents_start, lambda ctx, args: run_bulk(ctx, args, "start"))
agents_stop = one_or_many(commands.agents_stop, lambda ctx, args: run_bulk(ctx, args, "stop"))
agents_restart = one_or_many(commands.agents_restart, lambda ctx, args: run_bulk(ctx, args, "restart"))
agents_delete = one_or_many(commands.agents_delete, delete_many)
