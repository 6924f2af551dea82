"""Argument parsing, dispatch and error reporting of opmasctl. `run(argv)` is the testable entry."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import argcomplete
import grpc

# googleapis-common-protos ships no type information; unused-ignore keeps this line valid once
# the project's mypy config declares google.rpc untyped instead.
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from opmasctl import __version__, audit, bulk, commands, completion, credentials, logs, tokens, top
from opmasctl.bulk import add_selection_arguments
from opmasctl.commands import STATES, Context, UsageError
from opmasctl.connection import Connection, NoDaemon, find_daemon
from opmasctl.credentials import CredentialError
from opmasctl.daemon_config import ConfigProblem
from opmasctl.exits import (
    EXIT_DENIED,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    exit_status,
)
from opmasctl.output import FORMATS
from opmasctl.parsing import argtype, parse_duration
from opmasctl.spec import add_spec_arguments
from opmasctl.tables import TableStyle
from opmasctl.tls import flags_refused

Handler = Callable[[Context, argparse.Namespace], int]

# Commands that take the agent's command line after a bare `--`.
_TAKES_REST = {"register", "update"}
# Commands whose output names no agents: -o name means nothing there.
_NAMELESS = {"logs", "command"}
# Top-level commands that never talk to the daemon: no token or user file is looked at.
_OFFLINE = {"completion"}

EPILOG = """exit status:
  0    done
  1    the daemon refused or failed the request (any other gRPC error, DEADLINE_EXCEEDED
       included: the request may have been carried out), or an agent answered its
       command with an error
  2    usage: flags or arguments that make no sense
  3    not found: no such agent (NOT_FOUND)
  4    unavailable: no daemon answers, or it cannot serve now (UNAVAILABLE); try again later
  5    not allowed: no token, or one the daemon does not accept (UNAUTHENTICATED), or the
       token's role does not allow the request (PERMISSION_DENIED)
  130  interrupted (Ctrl-C)

finding the daemon: --server, else $OPMAS_SERVER, else `server:` in the user's file (below);
else the first that answers of the sockets and address in the daemon's configuration
($OPMAS_CONFIG, else /etc/opmas/opmasd.yaml), its default socket, /run/opmas/opmasd.sock and
127.0.0.1:50051.

the token (needed over TCP, not on the daemon's unix socket): --token, else $OPMAS_TOKEN, else
`token:` in $XDG_CONFIG_HOME/opmas/opmasctl.yaml (default ~/.config/opmas/opmasctl.yaml; keys
server and token only; it must be yours and, with a token in it, mode 600). It is sent on
every call as `authorization: Bearer <token>`, but only to a server named by --server,
$OPMAS_SERVER or `server:` in that file, over TCP: never to one found by searching, nor to a
unix socket. `opmasctl tokens create` makes one.

TLS: https://host:port, a daemon's address its configuration gives TLS, and any host:port when
--ca or --cert is given are dialled over TLS (http:// never; a unix socket never). The
daemon's certificate is checked against --ca (else the system's CAs) and must name the host;
--cert and --key present a client certificate to a daemon that asks for one (mTLS): the token
still decides what the caller may do. Each comes from its flag, else $OPMAS_CA, $OPMAS_CERT,
$OPMAS_KEY, else `ca:`, `cert:`, `key:` in the user's file (relative to its folder)."""


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global flags. On the subcommand parsers they default to SUPPRESS, so that a flag
    given after the subcommand overrides the top-level one and an absent one leaves it alone."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--server",
        default=default(None),
        metavar="ADDR",
        help="where opmasd listens: a socket path, unix:///path, host:port, dns:///host:port, "
        "http://host:port or https://host:port (TLS); default $OPMAS_SERVER, else `server:` in "
        f"{credentials.DEFAULT_DISPLAY}, else the local daemon (see below)",
    )
    parser.add_argument(
        "--token",
        default=default(None),
        metavar="TOKEN",
        help="the API token a daemon asks for over TCP, sent only to a server named by --server, "
        "$OPMAS_SERVER or `server:` (see below); default $OPMAS_TOKEN, else `token:` in "
        f"{credentials.DEFAULT_DISPLAY}. A token given here is visible to other users in `ps`: "
        "prefer $OPMAS_TOKEN or the file",
    )
    for name, what in (
        (
            "ca",
            "the CA certificates (PEM) that the daemon's TLS certificate is checked against "
            "(default: the system's)",
        ),
        ("cert", "a client certificate (PEM) for a daemon that asks for one (mTLS); needs --key"),
        ("key", "the client certificate's private key (PEM, not readable by every user)"),
    ):
        parser.add_argument(
            f"--{name}",
            default=default(None),
            metavar="FILE",
            help=f"{what}; else ${credentials.TLS_ENV[name]}, else `{name}:` in "
            f"{credentials.DEFAULT_DISPLAY}; with --ca or --cert a host:port server is dialled over TLS "
            "(see below)",
        )
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=default("table"),
        help="table (default), wide (more columns), json or yaml (as the REST API writes them), "
        "name (agent, token or audit record ids, one a line)",
    )
    parser.add_argument(
        "--no-headers",
        action="store_true",
        default=default(False),
        help="tables without their header line",
    )
    parser.add_argument(
        "--timeout",
        dest="call_timeout",
        type=argtype(commands.positive_seconds),
        default=default(30.0),
        metavar="SECONDS",
        help="deadline of each call (default 30; 0: none); not applied to --follow and watch",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opmasctl",
        description="Manage the agents of opmasd.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"opmasctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)

    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    agents = groups.add_parser("agents", help="manage agents", parents=[common])
    help_ = "a live full-screen view of the agents (keys: s sort, S start, x stop, R restart, l logs, q quit)"
    live = groups.add_parser("top", help=help_, description=help_, parents=[common])
    live.set_defaults(handler=top.top, parser=live, command_name="top")
    sub = agents.add_subparsers(dest="command_name", metavar="SUBCOMMAND", required=True)

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_, description=help_, parents=[common])
        command.set_defaults(handler=handler, parser=command)
        return command

    p = add("list", commands.agents_list, "list agents")
    p.add_argument("--state", choices=sorted(STATES))
    p.add_argument("--type")
    p.add_argument("--node")
    _selector_argument(p, "only the agents whose labels match")

    p = add("get", commands.agents_get, "show an agent's spec and status")
    p.add_argument("agent_id", metavar="ID")

    p = add("status", commands.agents_status, "show one agent's status, or all agents")
    p.add_argument("agent_id", metavar="ID", nargs="?")
    _selector_argument(p, "only the agents whose labels match")

    p = add("start", bulk.agents_start, "start agents: by id, --all or -l SELECTOR")
    add_selection_arguments(p, "start")

    p = add("stop", bulk.agents_stop, "stop agents: by id, --all or -l SELECTOR")
    add_selection_arguments(p, "stop")
    p.add_argument(
        "--grace",
        type=argtype(commands.grace),
        metavar="SECONDS",
        help="how long after SIGTERM before SIGKILL, instead of the agent's stop_timeout",
    )

    p = add("restart", bulk.agents_restart, "restart agents: by id, --all or -l SELECTOR")
    add_selection_arguments(p, "restart")

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

    p = add("delete", bulk.agents_delete, "stop and remove agents: by id, --all or -l SELECTOR")
    add_selection_arguments(p, "delete")

    p = add(
        "logs",
        logs.agents_logs,
        "print agents' output (stderr lines marked [err]; several agents' lines begin with [ID])",
    )
    p.add_argument("agent_ids", metavar="ID", nargs="*")
    _selector_argument(p, "the agents whose labels match")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only lines since then: a duration back from now (10m, 2h) or an RFC 3339 time",
    )
    p.add_argument(
        "-t", "--timestamps", action="store_true", help="begin each line with when it was stored (UTC)"
    )
    p.add_argument(
        "--tail",
        type=_non_negative_int,
        metavar="N",
        help="the last N lines (0: none, only new ones with -f; default 100, or all with --since)",
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="print control characters (ESC, CR, ...) as the agent wrote them; by default they are shown "
        "as \\xNN when stdout is a terminal (a pipe or file always gets the lines as written)",
    )

    add("discover", commands.agents_discover, "rescan the agents directories now")

    p = add("metrics", commands.agents_metrics, "show an agent's resource use and reported metrics")
    p.add_argument("agent_id", metavar="ID")

    p = add("command", commands.agents_command, "send a custom command to an agent")
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
        "--reply-timeout",
        type=argtype(parse_duration),
        metavar="SECONDS",
        help="how long the daemon waits for the agent's reply (default: the daemon's)",
    )

    p = add("watch", commands.agents_watch, "print agent state changes as they happen (Ctrl-C ends)")
    p.add_argument("agent_ids", metavar="ID", nargs="*")

    tokens.add_commands(groups, common)
    audit.add_command(groups, common)

    p = groups.add_parser(
        "completion",
        help="print the shell code that completes opmasctl",
        description=completion.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=completion.SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p.set_defaults(handler=completion.print_script, parser=p, command_name="completion")
    # Every agent-id positional above, and audit --agent, completes to the ids the daemon has.
    return completion.attach_completers(parser)


def _selector_argument(parser: argparse.ArgumentParser, help_: str) -> None:
    parser.add_argument(
        "-l", "--selector", metavar="SELECTOR", help=f"{help_} (kubectl's syntax: env=prod,role!=probe)"
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be between 0 and {2**31 - 1}")
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


def report_rpc_error(err: grpc.RpcError, connection: Connection, config_path: str | None = None) -> int:
    """Tells on stderr what went wrong, and returns the exit status for it."""
    tls_problem = connection.tls_problem(err)
    if tls_problem is not None:
        print(tls_problem, file=sys.stderr)
        return EXIT_UNAVAILABLE
    unreachable = connection.unreachable(err)
    if unreachable is not None:
        sys.stderr.write(unreachable.report())
        return EXIT_UNAVAILABLE
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    print(f"error: {code.name.lower()}: {details}", file=sys.stderr)
    for line in _violations(err):
        print(line, file=sys.stderr)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        print("  (--timeout SECONDS waits longer; 0 waits forever)", file=sys.stderr)
    if exit_status(code) == EXIT_DENIED:
        path = config_path or credentials.DEFAULT_DISPLAY
        hint = credentials.denied_hint(code.name, connection.token, path, connection.withheld)
        print(f"  {hint}", file=sys.stderr)
    return exit_status(code)


def _warn_config(problem: ConfigProblem) -> None:
    print(f"opmasctl: warning: ignoring {problem}", file=sys.stderr)


def run(argv: Sequence[str] | None = None) -> int:
    """Runs one opmasctl invocation and returns its exit status; never raises for user errors."""
    head, rest = _split_rest(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    # Under the shell's TAB (_ARGCOMPLETE set) this prints the completions and exits; otherwise
    # it returns at once.
    argcomplete.autocomplete(parser, always_complete_options=False)
    try:
        args = parser.parse_args(head)
    except SystemExit as exit_:
        # argparse exits for --help, --version (0) and usage errors (2); a return is testable.
        return _exit_code(exit_.code)
    command_parser: argparse.ArgumentParser = args.parser
    if rest and args.command_name not in _TAKES_REST:
        return _usage_error(command_parser, "unexpected arguments after --: " + " ".join(rest))
    if args.output == "name" and args.command_name in _NAMELESS:
        return _usage_error(command_parser, f"-o name: {args.command_name} prints no agents")
    offline = args.group in _OFFLINE
    tls_flags = {name: getattr(args, name) for name in credentials.TLS_ENV}
    try:
        found = None if offline else credentials.resolve(args.token, args.server, tls_flags=tls_flags)
    except CredentialError as err:
        return _usage_error(command_parser, str(err))
    user_server = found.server if found is not None else None
    try:
        search = find_daemon(args.server, user_server=user_server)
    except ValueError as err:
        if args.server or user_server is None:
            source = "--server" if args.server else "$OPMAS_SERVER"
        else:
            source = user_server[1]
        return _usage_error(command_parser, f"{source}: {err}")

    tls_refused = flags_refused(tls_flags, search.candidates[0].endpoint if search.explicit else None)
    if tls_refused is not None:
        return _usage_error(command_parser, tls_refused)
    token = found.token if found is not None else None
    tls = found.tls if found is not None else None
    config_path = str(found.path) if found is not None else None
    with Connection(search, on_problem=_warn_config, token=token, tls=tls) as connection:
        ctx = Context(
            connection=connection,
            fmt=args.output,
            timeout=args.call_timeout or None,
            rest=rest,
            style=TableStyle.detect(headers=not args.no_headers, wide=args.output == "wide"),
        )
        try:
            handler: Handler = args.handler
            return handler(ctx, args)
        except (UsageError, CredentialError) as err:
            # CredentialError here: a TLS file, read when the channel opens.
            return _usage_error(command_parser, str(err))
        except NoDaemon as err:
            sys.stderr.write(err.report())
            return EXIT_UNAVAILABLE
        except grpc.RpcError as err:
            return report_rpc_error(err, connection, config_path)
        except KeyboardInterrupt:
            # Ctrl-C during a unary call: the user gave up waiting.
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`opmasctl agents logs x | head`): stop quietly.
            _silence_stdout()
            return 0


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _silence_stdout() -> None:
    # Python would otherwise report the broken pipe again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
