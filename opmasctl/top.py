"""The `opmasctl top` command: a live full-screen table of the agents (textual, see top_app).

It refuses to run without a terminal, lists the agents once before the screen takes over (so
an unreachable daemon is reported as by any other command), then runs the view until `q`
(exit 0) or Ctrl-C (130).
"""

from __future__ import annotations

import argparse
import sys
import time

from opmasctl import commands
from opmasctl.commands import Context, UsageError

# Exit status of a usage error, as argparse's.
USAGE = 2


def top(ctx: Context, args: argparse.Namespace) -> int:
    if not ctx.human:
        raise UsageError(f"-o {ctx.fmt}: top is a live view; use `opmasctl -o {ctx.fmt} agents list`")
    # textual reads keys from stdin and draws on stdout and stderr: all three must be the terminal.
    streams = {"standard input": sys.stdin, "standard output": sys.stdout, "standard error": sys.stderr}
    redirected = [name for name, stream in streams.items() if stream is None or not stream.isatty()]
    if redirected:
        print(
            f"opmasctl top: error: needs a terminal (not one: {', '.join(redirected)}); "
            "in scripts use `opmasctl agents list` or `opmasctl agents watch`",
            file=sys.stderr,
        )
        return USAGE
    listed_at = time.monotonic()
    # gRPC errors here propagate to cli.run, which reports them before any screen is drawn.
    agents = commands.list_agents(ctx)

    # textual loads only for this command: the others start no slower for it.
    from opmasctl.top_app import TopApp
    from opmasctl.top_feed import Link

    # The token the first calls presented, if any: Link's channels send it as given.
    link = Link(ctx.connection.endpoint, ctx.timeout, ctx.connection.sent_token, ctx.connection.tls)
    app = TopApp(link, agents, listed_at)
    try:
        app.run()
    finally:
        # Also when app.run() ends by an exception (a SIGINT from outside): no worker may stay
        # blocked in a call, or the interpreter waits for it at exit.
        app.stop_feed()
    return app.return_code if app.return_code is not None else 0
