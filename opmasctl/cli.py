"""Argument parsing, dispatch and error reporting of opmasctl. `run(argv)` is the testable entry."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import grpc

# googleapis-common-protos ships no type information; unused-ignore keeps this line valid once
# the project's mypy config declares google.rpc untyped instead.
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from opmasctl import __version__, commands
from opmasctl.commands import STATES, Context, UsageError
from opmasctl.connection import Connection, resolve_endpoint
from opmasctl.output import FORMATS
from opmasctl.parsing import argtype, parse_duration
from opmasctl.spec import add_spec_arguments

Handler = Callable[[Context, argparse.Namespace], int]

# Commands that take the agent's command line after a bare `--`.
_TAKES_REST = {"register", "update"}


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool, timeout: bool = True) -> None:
    """The global flags. On the subcommand parsers they default to SUPPRESS, so that a flag
    given after the subcommand overrides the top-level one and an absent one leaves it alone."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--server",
        default=default(None),
        metavar="ADDR",
        help="unix socket path (/path/opmasd.sock, unix:///path) or host:port; "
        "default $OPMAS_SERVER, else the local daemon's socket, else 127.0.0.1:50051",
    )
    parser.add_argument("-o", "--output", choices=FORMATS, default=default("table"), help="output format")
    if timeout:
        parser.add_argument(
            "--timeout",
            dest="call_timeout",
            type=argtype(commands.positive_seconds),
            default=default(30.0),
            metavar="SECONDS",
            help="deadline of each call (default 30; 0: none); not applied to --follow and watch",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opmasctl", description="Manage the agents of opmasd.")
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"opmasctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    # stop and command have a --timeout of their own (sent to the server); the call deadline is
    # then only settable before the subcommand.
    common_no_timeout = argparse.ArgumentParser(add_help=False)
    _global_options(common_no_timeout, suppress=True, timeout=False)

    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    agents = groups.add_parser("agents", help="manage agents", parents=[common])
    sub = agents.add_subparsers(dest="command_name", metavar="SUBCOMMAND", required=True)

    def add(name: str, handler: Handler, help_: str, *, own_timeout: bool = False) -> argparse.ArgumentParser:
        parent = common_no_timeout if own_timeout else common
        command = sub.add_parser(name, help=help_, description=help_, parents=[parent])
        command.set_defaults(handler=handler, parser=command)
        return command

    p = add("list", commands.agents_list, "list agents")
    p.add_argument("--state", choices=sorted(STATES))
    p.add_argument("--type")
    p.add_argument("--node")

    p = add("get", commands.agents_get, "show an agent's spec and status")
    p.add_argument("agent_id", metavar="ID")

    p = add("status", commands.agents_status, "show one agent's status, or all agents")
    p.add_argument("agent_id", metavar="ID", nargs="?")

    p = add("start", commands.agents_start, "start an agent")
    p.add_argument("agent_id", metavar="ID")

    p = add("stop", commands.agents_stop, "stop an agent", own_timeout=True)
    p.add_argument("agent_id", metavar="ID")
    p.add_argument(
        "--timeout",
        dest="stop_timeout",
        type=argtype(parse_duration),
        metavar="SECONDS",
        help="grace period before SIGKILL, instead of the agent's stop_timeout",
    )

    p = add("restart", commands.agents_restart, "restart an agent")
    p.add_argument("agent_id", metavar="ID")

    p = add(
        "register",
        commands.agents_register,
        "register an agent from a manifest on the daemon's host, or from flags",
    )
    p.usage = (
        "%(prog)s (--manifest PATH | --name NAME (--command CMD | -- PROG [ARG ...])) [--id ID] [--start] ..."
    )
    p.add_argument("--manifest", metavar="PATH", help="agent.yaml or its folder (made absolute here)")
    p.add_argument("--id", metavar="ID", help="agent id (default: derived from the name)")
    p.add_argument("--start", action="store_true", help="start the agent once registered")
    add_spec_arguments(p, update=False)

    p = add("update", commands.agents_update, "change the given fields of an agent's spec")
    p.add_argument("agent_id", metavar="ID")
    add_spec_arguments(p, update=True)

    p = add("delete", commands.agents_delete, "stop and remove an agent")
    p.add_argument("agent_id", metavar="ID")

    p = add("logs", commands.agents_logs, "print an agent's output (stderr lines marked [err])")
    p.add_argument("agent_id", metavar="ID")
    p.add_argument(
        "-t", "--timestamps", action="store_true", help="begin each line with when it was stored (UTC)"
    )
    p.add_argument(
        "--tail", type=_non_negative_int, default=0, metavar="N", help="last N lines (default 100)"
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")

    add("discover", commands.agents_discover, "rescan the agents directories now")

    p = add("metrics", commands.agents_metrics, "show an agent's resource use and reported metrics")
    p.add_argument("agent_id", metavar="ID")

    p = add("command", commands.agents_command, "send a custom command to an agent", own_timeout=True)
    p.add_argument("agent_id", metavar="ID")
    p.add_argument("command", metavar="NAME")
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        metavar="KEY=VALUE",
        help="parameter (repeatable); VALUE is read as JSON when it parses, else as a string",
    )
    p.add_argument(
        "--timeout",
        dest="command_timeout",
        type=argtype(parse_duration),
        metavar="SECONDS",
        help="how long the daemon waits for the agent's reply",
    )

    p = add("watch", commands.agents_watch, "print agent state changes as they happen (Ctrl-C ends)")
    p.add_argument("agent_ids", metavar="ID", nargs="*")
    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must not be negative")
    return value


def _split_rest(argv: list[str]) -> tuple[list[str], list[str]]:
    """Arguments before and after the first bare `--` (the agent's own argv is not ours to parse)."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    # SystemExit("message") prints the message and means failure.
    print(code, file=sys.stderr)
    return 1


def _violations(err: grpc.RpcError) -> list[str]:
    """The field violations of a google.rpc.BadRequest in the status details, if any."""
    if not isinstance(err, grpc.Call):
        return []
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        # The trailer disagrees with the call's own code or message; nothing trustworthy to show.
        return []
    if status is None:
        return []
    lines: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines.extend(f"  {v.field}: {v.description}" for v in bad_request.field_violations)
    return lines


def report_rpc_error(err: grpc.RpcError, connection: Connection) -> None:
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    if connection.is_connect_failure(err):
        print(f"error: cannot reach opmasd at {connection.endpoint.display}: {details}", file=sys.stderr)
        return
    print(f"error: {code.name.lower()}: {details}", file=sys.stderr)
    for line in _violations(err):
        print(line, file=sys.stderr)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        print("  (--timeout SECONDS before the command waits longer; 0 waits forever)", file=sys.stderr)


def run(argv: Sequence[str] | None = None) -> int:
    """Runs one opmasctl invocation and returns its exit status; never raises for user errors."""
    head, rest = _split_rest(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(head)
    except SystemExit as exit_:
        # argparse exits for --help, --version (0) and usage errors (2); a return is testable.
        return _exit_code(exit_.code)
    command_parser: argparse.ArgumentParser = args.parser
    if rest and args.command_name not in _TAKES_REST:
        return _usage_error(command_parser, "unexpected arguments after --: " + " ".join(rest))
    try:
        endpoint = resolve_endpoint(args.server)
    except ValueError as err:
        return _usage_error(command_parser, f"--server: {err}")

    with Connection(endpoint) as connection:
        ctx = Context(
            stub=connection.stub,
            fmt=args.output,
            timeout=args.call_timeout or None,
            rest=rest,
        )
        try:
            handler: Handler = args.handler
            return handler(ctx, args)
        except UsageError as err:
            return _usage_error(command_parser, str(err))
        except grpc.RpcError as err:
            report_rpc_error(err, connection)
            return 1
        except KeyboardInterrupt:
            # Ctrl-C during a unary call: the user gave up waiting; the usual 128+SIGINT.
            return 130
        except BrokenPipeError:
            # The reader went away (`opmasctl agents logs x | head`): stop quietly.
            _silence_stdout()
            return 0


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _silence_stdout() -> None:
    # Python would otherwise report the broken pipe again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
