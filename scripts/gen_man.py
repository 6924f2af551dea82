"""Render the man pages opmasctl(1) and opmasd(8) from the programs' own argparse parsers.

`make man` runs `python scripts/gen_man.py [OUT_DIR]` (default build/man) and writes
`opmasctl.1` and `opmasd.8` there; packaging installs them, nothing generated is committed.
argparse-manpage turns the parsers into roff — NAME, SYNOPSIS, DESCRIPTION, OPTIONS and one
subsection per (sub)command, so a new flag or command shows up without touching this file —
and the sections a parser cannot know (exit status, environment, files, ...) are written here.

Set SOURCE_DATE_EPOCH for a reproducible date in the page footer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

from opmasctl import __version__
from opmasctl.cli import build_parser as opmasctl_parser
from opmasd.__main__ import build_parser as opmasd_parser

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "man"
MANUAL = "OPMAS Manual"


@dataclass(frozen=True)
class Page:
    name: str
    section: int
    summary: str  # the NAME line's text after "name \-"
    # Sections in order after the commands, as (heading, roff body).
    sections: tuple[tuple[str, str], ...]
    intro: str = ""  # roff before the parser's description

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


class _Unwrapped(argparse.HelpFormatter):
    """Usage and help text on one line each: groff fills them to the reader's width (argparse's
    own line breaks, meant for an 80-column terminal, come out as ragged lines in a man page)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        super().__init__(prog, indent_increment, max_help_position, width=100_000)


def _tp(term: str, text: str) -> str:
    return f".TP\n{term}\n{text}"


OPMASCTL_INTRO = r"""\fBopmasctl\fR talks to \fBopmasd\fR(8) over its gRPC API: on the unix socket of the
local daemon by default, or on the address that \fB\-\-server\fR or \fBOPMAS_SERVER\fR names.
The global options may be given before or after the command; \fB\-o json\fR and
\fB\-o yaml\fR print the API's messages for scripts. \fB\-h\fR or \fB\-\-help\fR after any
command prints its usage."""

OPMASCTL_SECTIONS = (
    (
        "EXIT STATUS",
        "\n".join(
            (
                _tp(".B 0", "Success."),
                _tp(".B 1", "opmasd answered with an error; its message, and each bad field, is on stderr."),
                _tp(".B 2", "Usage error: unknown command or option, or a bad value."),
                _tp(".B 3", "Not found: no agent has the given id."),
                _tp(".B 4", "Unavailable: opmasd cannot be reached, or is shutting down."),
                _tp(
                    ".B 5",
                    "Not allowed: no token, one the daemon does not accept (mistyped, expired, "
                    "revoked), or one whose role is too low.",
                ),
                _tp(
                    ".B 130",
                    r"Interrupted (Ctrl\-C), as when \fBagents watch\fR or \fBagents logs \-\-follow\fR "
                    "is ended.",
                ),
            )
        ),
    ),
    (
        "ENVIRONMENT",
        "\n".join(
            (
                _tp(
                    ".B OPMAS_SERVER",
                    r"The daemon's address when \fB\-\-server\fR is not given: a unix socket path "
                    r"(\fI/path/opmasd.sock\fR, \fIunix:///path\fR, \fIunix:path\fR), "
                    r"\fIhost\fR:\fIport\fR, \fIdns:///host:port\fR or \fIhttp(s)://host:port\fR.",
                ),
                _tp(
                    ".B OPMAS_TOKEN",
                    r"The API token sent to a daemon reached over TCP (after \fB\-\-token\fR, which "
                    "other users can see in ps; before the user's file). It is sent only to a server "
                    r"named by \fB\-\-server\fR, \fBOPMAS_SERVER\fR or the user's file's "
                    r"\fIserver:\fR, over TCP: never to one found by searching, nor to a unix socket "
                    "(the local socket needs none).",
                ),
                _tp(
                    '.BR OPMAS_CA ", " OPMAS_CERT ", " OPMAS_KEY',
                    r"TLS files (PEM), after \fB\-\-ca\fR, \fB\-\-cert\fR and \fB\-\-key\fR and "
                    r"before the user's file's \fIca:\fR, \fIcert:\fR and \fIkey:\fR: the CA the "
                    "daemon's certificate is checked against (default: the system's), and a client "
                    "certificate and its key for a daemon that asks for one (mTLS). With a CA or a "
                    r"client certificate, a \fIhost\fR:\fIport\fR server is dialled over TLS; "
                    r"\fIhttps://\fR always is, \fIhttp://\fR and unix sockets never.",
                ),
                _tp(
                    ".B XDG_CONFIG_HOME",
                    r"Where the user's file is: \fI$XDG_CONFIG_HOME/opmas/opmasctl.yaml\fR "
                    r"(default \fI~/.config/opmas/opmasctl.yaml\fR).",
                ),
                _tp(
                    ".B XDG_RUNTIME_DIR",
                    r"Where a daemon run by this (non-root) user has its socket: "
                    r"\fI$XDG_RUNTIME_DIR/opmas/opmasd.sock\fR.",
                ),
                _tp(
                    ".B OPMAS_CONFIG",
                    r"The daemon's configuration file (default \fI/etc/opmas/opmasd.yaml\fR): "
                    r"without \fB\-\-server\fR, opmasctl tries the socket and address it names "
                    "first, then the default socket, /run/opmas/opmasd.sock and 127.0.0.1:50051.",
                ),
                _tp(
                    ".B NO_COLOR",
                    "When set to a non-empty value, no colour in the output; states are always "
                    "written out in words.",
                ),
            )
        ),
    ),
    (
        "FILES",
        "\n".join(
            (
                _tp(
                    ".I ~/.config/opmas/opmasctl.yaml",
                    r"This user's \fIserver:\fR, \fItoken:\fR, \fIca:\fR, \fIcert:\fR and "
                    r"\fIkey:\fR (used after the options and the environment; paths relative to its "
                    "folder); refused unless owned by this user and not readable or writable by "
                    "others (chmod 600).",
                ),
                _tp(
                    ".I /run/opmas/opmasd.sock",
                    r"The daemon's socket when it runs as root (\fIgrpc.socket\fR in its "
                    "configuration); tried when no server is named (see OPMAS_CONFIG).",
                ),
                _tp(
                    ".I /etc/opmas/opmasd.yaml",
                    r"The daemon's configuration (see \fBopmasd\fR(8)).",
                ),
            )
        ),
    ),
    ("SEE ALSO", r"\fBopmasd\fR(8), \fBsystemctl\fR(1), \fBjournalctl\fR(1)"),
)

OPMASD_INTRO = r"""\fBopmasd\fR runs and supervises the OPMAS agents: long-running programs that watch network
devices, process events and publish findings. It keeps their specs and states in SQLite or
PostgreSQL, starts an embedded NATS server unless one is configured, and serves the opmas.v1
gRPC API on a unix socket and on TCP, the same API as REST, \fI/metrics\fR, \fI/healthz\fR and
\fI/readyz\fR. \fBopmasctl\fR(1) is its command-line client.
.PP
It runs in the foreground; under systemd as a Type=notify service (READY=1, STATUS=, WATCHDOG=1,
STOPPING=1). SIGTERM or SIGINT stops it gracefully (a second one forces the exit within about
2 seconds); SIGHUP re-reads the configuration (the TLS certificate, key and client CA of the TCP listeners
included, for new connections) and rescans the agents directories."""

OPMASD_SECTIONS = (
    (
        "EXIT STATUS",
        "\n".join(
            (
                _tp(".B 0", r"Stopped after SIGTERM or SIGINT, or \fB\-\-check\-config\fR found no fault."),
                _tp(
                    ".B 1",
                    "Could not start: another opmasd holds the state directory, a listener or the "
                    "store could not be opened.",
                ),
                _tp(
                    ".B 2",
                    "Configuration error (the file, the key and the reason are printed), or bad usage.",
                ),
            )
        ),
    ),
    (
        "ENVIRONMENT",
        "\n".join(
            (
                _tp(
                    ".B OPMAS_CONFIG",
                    r"The configuration file when \fB\-\-config\fR is not given.",
                ),
                _tp(
                    r".BI OPMAS_ SECTION _ KEY",
                    r"Overrides one configuration key, e.g. \fBOPMAS_GRPC_ADDRESS\fR=0.0.0.0:50051 or "
                    r"\fBOPMAS_DATABASE_URL\fR=postgresql://opmas@db/opmas.",
                ),
                _tp(
                    ".B OPMAS_SERVER",
                    r"Read by \fBopmasctl\fR(1), not by opmasd: the address of the daemon to manage.",
                ),
                _tp(
                    ".B NO_COLOR",
                    r"Read by \fBopmasctl\fR(1). opmasd colours its console log only on a terminal; "
                    r"\fIservice.log_format\fR json or journal has none.",
                ),
                _tp(
                    '.BR STATE_DIRECTORY ", " RUNTIME_DIRECTORY ", " LOGS_DIRECTORY',
                    "Set by systemd: the default state, runtime and log directories.",
                ),
            )
        ),
    ),
    (
        "FILES",
        "\n".join(
            (
                _tp(".I /etc/opmas/opmasd.yaml", "The configuration, when it exists."),
                _tp(
                    ".I /run/opmas/opmasd.sock",
                    r"The gRPC socket (\fIgrpc.socket\fR; as another user "
                    r"\fI$XDG_RUNTIME_DIR/opmas/opmasd.sock\fR). Its owner, group and mode are its "
                    "access control.",
                ),
                _tp(
                    ".I /var/lib/opmas",
                    "The state directory: the SQLite database, the embedded NATS server's data and port.",
                ),
                _tp(".I /var/log/opmas/agents/", r"The agents' output, \fIID\fR.log and its rotations."),
                _tp(
                    '.IR /usr/lib/opmas/agents ", " /etc/opmas/agents.d',
                    "The agents directories, scanned for agent packages (agent.yaml).",
                ),
            )
        ),
    ),
    ("SEE ALSO", r"\fBopmasctl\fR(1), \fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBsystemd.service\fR(5)"),
)

PAGES = {
    "opmasctl": Page("opmasctl", 1, "manage the agents of opmasd", OPMASCTL_SECTIONS, OPMASCTL_INTRO),
    "opmasd": Page("opmasd", 8, "the OPMAS agent manager daemon", OPMASD_SECTIONS, OPMASD_INTRO),
}


def _subparser_actions(
    parser: argparse.ArgumentParser,
) -> list[argparse._SubParsersAction[argparse.ArgumentParser]]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _is_subparsers(action: argparse.Action) -> bool:
    return isinstance(action, argparse._SubParsersAction)


def _for_the_page(parser: argparse.ArgumentParser, global_dests: frozenset[str] = frozenset()) -> None:
    """Readies a freshly built parser (never the one a program runs with) for the page: text
    unwrapped, the global options listed once in OPTIONS instead of under every command, -h
    left out (DESCRIPTION says it once), the commands after the options, and a command's
    description dropped where it only repeats its one-line help. argparse has no public API
    for any of this; the parser is thrown away afterwards."""
    parser.formatter_class = _Unwrapped
    top = not global_dests
    if top:
        global_dests = frozenset(a.dest for a in parser._actions if a.option_strings)
        commands = [g for g in parser._action_groups if any(map(_is_subparsers, g._group_actions))]
        for group in commands:
            group.title = "commands"
            parser._action_groups.remove(group)
            parser._action_groups.append(group)
    for action in parser._actions:
        # The global options repeated on each command default to SUPPRESS (cli._global_options).
        repeated = not top and action.dest in global_dests and action.default is argparse.SUPPRESS
        if action.option_strings and (repeated or isinstance(action, argparse._HelpAction)):
            action.help = argparse.SUPPRESS
    for subparsers in _subparser_actions(parser):
        helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
        for name, command in subparsers.choices.items():
            if command.description == helps.get(name):
                command.description = None
            _for_the_page(command, global_dests)


def render(page: Page) -> str:
    """The roff source of one page."""
    parser = opmasctl_parser() if page.name == "opmasctl" else opmasd_parser()
    _for_the_page(parser)
    if page.intro:
        # The hand-written DESCRIPTION says it all; the parser's one line is the NAME already.
        parser.description = None
    # The --help epilog (exit statuses, finding the daemon) is in EXIT STATUS, ENVIRONMENT and
    # FILES here, as roff; argparse-manpage would repeat it run together under COMMENTS.
    parser.epilog = None
    manpage = Manpage(
        parser,
        {
            "description": page.summary,
            "manual_section": page.section,
            "manual_title": MANUAL,
            "project_name": "opmas",
            "version": __version__,
        },
        format="single-commands-section",
    )
    if page.intro:
        manpage.add_section("description", "=", page.intro)
    for heading, body in page.sections:
        manpage.add_section(heading, ">", body)
    header, body = str(manpage).split("\n", 1)
    # Ragged right and no hyphenation: an option name or a path must not break at a hyphen.
    return f"{header}\n.nh\n.ad l\n{body}"


def write_man_pages(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Writes every page into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for page in PAGES.values():
        path = out_dir / page.filename
        path.write_text(render(page), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else DEFAULT_OUT
    for path in write_man_pages(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
