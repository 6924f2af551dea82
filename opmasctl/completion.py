"""Tab completion of opmasctl: the shell script to source, and agent ids asked from the daemon.

argcomplete does the work. `opmasctl completion SHELL` prints argcomplete's own shell code for
bash, zsh or fish; on each TAB that code runs opmasctl with `_ARGCOMPLETE` set, and
`argcomplete.autocomplete(parser)` in cli.run answers from the parser (commands, flags,
choices) and from the completers attached here, then exits before anything else runs.

    source <(opmasctl completion bash)       # ~/.bashrc
    source <(opmasctl completion zsh)        # ~/.zshrc, after compinit
    opmasctl completion fish > ~/.config/fish/completions/opmasctl.fish
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import grpc
from argcomplete.io import debug
from argcomplete.shell_integration import shellcode

from opmas.v1 import agents_pb2
from opmasctl import credentials
from opmasctl.commands import Context
from opmasctl.connection import Connection, NoDaemon, find_daemon

PROG = "opmasctl"
SHELLS = ("bash", "zsh", "fish")
# A TAB must not hang the prompt: the whole listing, every page of it, within this.
LIST_DEADLINE = 2.0
# The positionals that name agents, by dest (`agents stop ID`, `agents watch [ID ...]`).
AGENT_ID_DESTS = frozenset({"agent_id", "agent_ids"})
# The options that name one agent, by dest (`audit --agent ID`); not `register --id`, a new id.
AGENT_ID_OPTION_DESTS = frozenset({"agent"})
DESCRIPTION = """\
Print the shell code that completes opmasctl's commands, flags and agent ids:

  bash  source <(opmasctl completion bash)        (in ~/.bashrc)
  zsh   source <(opmasctl completion zsh)         (in ~/.zshrc, after compinit)
  fish  opmasctl completion fish > ~/.config/fish/completions/opmasctl.fish

Agent ids are asked from the daemon that --server (or OPMAS_SERVER) names, at each TAB
and for 2 seconds at most."""


def shell_script(shell: str) -> str:
    """What to source in SHELL to complete opmasctl: argcomplete's generator, nothing of ours."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for {shell!r}: one of {', '.join(SHELLS)}")
    return shellcode([PROG], shell=shell)


def print_script(ctx: Context, args: argparse.Namespace) -> int:
    """`opmasctl completion SHELL`: print the script; it needs no daemon."""
    sys.stdout.write(shell_script(args.shell))
    return 0


def agent_ids(
    *, prefix: str, action: argparse.Action, parsed_args: argparse.Namespace, **_: object
) -> list[str]:
    """An argcomplete completer: the ids of the daemon's agents that start with the prefix.

    The daemon is the one a `--server` typed earlier on the line names, else the usual
    (OPMAS_SERVER, `server:` in the user's file, the local socket, TCP), asked with the token
    opmasctl would send (--token typed earlier, OPMAS_TOKEN, the file), to whom it would send it
    (a server named, over TCP). Ids already given to a repeatable positional (watch) are left
    out. A daemon that cannot be asked gives no completions and no output: a TAB must not print
    errors over the command line (`_ARC_DEBUG=1` shows why).
    """
    server = getattr(parsed_args, "server", None)
    try:
        tls_flags = {name: getattr(parsed_args, name, None) for name in credentials.TLS_ENV}
        found = credentials.resolve(getattr(parsed_args, "token", None), server, tls_flags=tls_flags)
        search = find_daemon(server, user_server=found.server)
    except credentials.CredentialError as err:
        debug(f"opmasctl: {err}")
        return []
    except ValueError as err:
        debug(f"opmasctl: --server: {err}")
        return []
    given = getattr(parsed_args, action.dest, None)
    taken = set(given) if isinstance(given, list) else set()
    # The search (and so the rule for the token) is the one every command follows.
    with Connection(search, token=found.token, tls=found.tls) as connection:
        try:
            return [
                agent_id
                for agent_id in _all_ids(connection)
                if agent_id.startswith(prefix) and agent_id not in taken
            ]
        except NoDaemon as err:
            debug(f"opmasctl: {err.report().strip()}")
            return []
        except credentials.CredentialError as err:  # a TLS file, read when the channel opens
            debug(f"opmasctl: {err}")
            return []
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            debug(f"opmasctl: cannot list agents at {connection.endpoint.display}: {code}")
            return []


def _all_ids(connection: Connection) -> Iterator[str]:
    request = agents_pb2.ListAgentsRequest(page_size=1000)
    deadline = time.monotonic() + LIST_DEADLINE
    seen_tokens: set[str] = set()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        response = connection.stub.ListAgents(request, timeout=remaining)
        yield from (agent.agent_id for agent in response.agents)
        token = response.next_page_token
        if not token or token in seen_tokens:
            return
        seen_tokens.add(token)
        request.page_token = token


def attach_completers(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Gives every agent-id positional and option, in every subcommand, the live `agent_ids`
    completer."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                attach_completers(command)
        elif action.dest in (AGENT_ID_OPTION_DESTS if action.option_strings else AGENT_ID_DESTS):
            # argcomplete's protocol: a `completer` attribute on the action.
            action.completer = agent_ids  # type: ignore[attr-defined]
    return parser
