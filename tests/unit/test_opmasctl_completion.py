"""opmasctl's tab completion without a shell: the agent-id completer against an in-process
server, a missing one and a silent one; argcomplete's wire protocol run on the console script;
and what completion must not change when nobody presses TAB.

The shells themselves (bash, zsh, fish) against a real opmasd: tests/e2e/test_opmasctl_completion.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import argcomplete
import grpc
import pytest
from argcomplete.shell_integration import shellcode

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl import completion
from opmasctl.cli import build_parser, run

BIN = Path(sys.executable).parent
OPMASCTL = BIN / "opmasctl"


class Pages(agents_pb2_grpc.AgentServiceServicer):
    """ListAgents in pages of two; `requests` counts the calls."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.requests = 0

    def ListAgents(self, request, context):  # type: ignore[no-untyped-def]
        self.requests += 1
        start = int(request.page_token or 0)
        end = start + 2
        return agents_pb2.ListAgentsResponse(
            agents=[agents_pb2.Agent(agent_id=i) for i in self.ids[start:end]],
            next_page_token=str(end) if end < len(self.ids) else "",
        )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, Pages]]:
    """A fake daemon on a unix socket: (its socket path, its servicer)."""
    service = Pages(["alpha", "alpine", "beta", "gamma", "gauge"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agents_pb2_grpc.add_AgentServiceServicer_to_server(service, server)
    path = tmp_path / "fake.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield str(path), service
    finally:
        server.stop(None)


def actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """Every action of every (sub)parser, with the parser's prog."""
    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from actions(command)


def complete(server: str | None, dest: str = "agent_id", prefix: str = "", **given: Any) -> list[str]:
    return completion.agent_ids(
        prefix=prefix,
        action=argparse.Action([], dest),
        parser=argparse.ArgumentParser(),
        parsed_args=argparse.Namespace(server=server, **given),
    )


def test_every_agent_id_positional_completes_from_the_daemon() -> None:
    ids = [(prog, a) for prog, a in actions(build_parser()) if not a.option_strings and a.metavar == "ID"]
    # get status start stop restart update delete logs metrics command watch, at least.
    assert len(ids) >= 11, [prog for prog, _ in ids]
    for prog, action in ids:
        assert getattr(action, "completer", None) is completion.agent_ids, prog
    # Nothing else asks the daemon: `command ID NAME` completes the id, not the command name.
    others = [prog for prog, a in actions(build_parser()) if a.metavar != "ID" and hasattr(a, "completer")]
    assert others == []


def test_ids_from_every_page_that_start_with_the_prefix(daemon: tuple[str, Pages]) -> None:
    path, service = daemon
    assert complete(path) == ["alpha", "alpine", "beta", "gamma", "gauge"]
    assert service.requests == 3
    assert complete(path, prefix="ga") == ["gamma", "gauge"]
    assert complete(f"unix://{path}", prefix="alp") == ["alpha", "alpine"]
    assert complete(path, prefix="zz") == []


def test_ids_already_given_to_watch_are_left_out(daemon: tuple[str, Pages]) -> None:
    path, _ = daemon
    assert complete(path, "agent_ids", agent_ids=["alpha", "gamma"]) == ["alpine", "beta", "gauge"]


def test_opmas_server_names_the_daemon_when_no_server_was_typed(
    daemon: tuple[str, Pages], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = daemon
    monkeypatch.setenv("OPMAS_SERVER", path)
    assert complete(None, prefix="b") == ["beta"]


def test_no_daemon_completes_nothing_and_prints_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert complete(str(tmp_path / "absent.sock")) == []
    assert complete("not an address") == []
    assert capfd.readouterr() == ("", "")


def test_a_daemon_that_never_answers_is_given_up_within_the_deadline(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Takes the connection (the kernel's backlog) and never speaks HTTP/2.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        began = time.monotonic()
        assert complete(f"127.0.0.1:{port}") == []
        took = time.monotonic() - began
    assert completion.LIST_DEADLINE - 0.5 < took < completion.LIST_DEADLINE + 1.5, took
    assert capfd.readouterr() == ("", "")


def tab(line: str, env: dict[str, str] | None = None) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """One TAB at the end of `line`, the way argcomplete's shell code asks the console script:
    _ARGCOMPLETE set, the line in COMP_LINE, the answer on a file instead of fd 8."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"opmasctl-tab-{os.getpid()}-{time.monotonic_ns()}"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPMAS_", "_ARC"))},
        **(env or {}),
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_SHELL": "bash",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
    }
    try:
        result = subprocess.run(
            [str(OPMASCTL)], env=environment, capture_output=True, text=True, timeout=30, check=False
        )
        words = out.read_text().split("\013") if out.exists() else []
    finally:
        out.unlink(missing_ok=True)
    return [w for w in words if w], result


def test_a_tab_with_no_daemon_completes_nothing_and_writes_nothing(tmp_path: Path) -> None:
    words, result = tab(f"opmasctl --server {tmp_path / 'absent.sock'} agents stop ")
    assert (words, result.returncode, result.stdout, result.stderr) == ([], 0, "", "")
    # The same process, asked for something the parser alone knows, does answer.
    words, result = tab("opmasctl agents st")
    assert sorted(words) == ["start", "status", "stop"], result.stderr


def test_a_tab_asks_the_daemon_on_the_line(daemon: tuple[str, Pages]) -> None:
    path, _ = daemon
    words, result = tab(f"opmasctl --server {path} agents logs al")
    assert sorted(words) == ["alpha", "alpine"], result.stderr
    # --server after the command counts too, as it does when the command runs.
    words, result = tab(f"opmasctl agents restart --server {path} g")
    assert sorted(words) == ["gamma", "gauge"], result.stderr


def test_not_completing_costs_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("_ARGCOMPLETE", raising=False)

    def no_exit(code: int = 0) -> None:
        raise AssertionError(f"argcomplete exited ({code}) though nobody is completing")

    # Without _ARGCOMPLETE argcomplete returns at once: no output, no exit, no completer run.
    def asked(**_: object) -> list[str]:
        raise AssertionError("a completer ran outside completion")

    monkeypatch.setattr(completion, "agent_ids", asked)
    argcomplete.autocomplete(build_parser(), exit_method=no_exit)
    assert run(["--help"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (build_parser().format_help(), "")
    assert run(["--server", "/nonexistent/opmasd.sock", "completion", "bash"]) == 0
    assert capsys.readouterr().out == shellcode(["opmasctl"], shell="bash")


def test_help_of_the_console_script_is_plain_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    env = {k: v for k, v in os.environ.items() if not k.startswith("_ARC")}
    result = subprocess.run(
        [str(OPMASCTL), "--help"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    expected = build_parser().format_help()
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")
    assert "completion" in expected


@pytest.mark.parametrize(
    ("shell", "registration"),
    [
        ("bash", "complete -o nospace -o default -o bashdefault -F _python_argcomplete opmasctl"),
        ("zsh", "compdef _python_argcomplete opmasctl"),
        ("fish", "complete --command opmasctl -f -a '(__fish_opmasctl_complete)'"),
    ],
)
def test_completion_prints_argcomplete_shell_code(
    shell: str, registration: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["completion", shell]) == 0
    out = capsys.readouterr().out
    assert out == shellcode(["opmasctl"], shell=shell)
    assert registration in out


def test_completion_of_an_unknown_shell_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["completion", "tcsh"]) == 2
    assert "invalid choice: 'tcsh'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tcsh"):
        completion.shell_script("tcsh")


def test_argcomplete_finds_its_marker_for_the_console_script_and_python_m() -> None:
    """activate-global-python-argcomplete completes only programs that carry the marker: it
    looks in the console script's module and in the package's __main__."""
    for check, target in (
        ("argcomplete._check_console_script", str(OPMASCTL)),
        ("argcomplete._check_module", "opmasctl"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", check, target], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, (check, result.stdout + result.stderr)
