"""`opmasctl top` as a user runs it: in a real terminal (tmux), against a real daemon.

Each test starts a tmux server of its own (`tmux -L <unique>`, never the user's), runs
`opmasctl top` in a 160x40 window behind a wrapper that writes its exit status to a file, and
reads the screen with `capture-pane`. What the screen shows is checked against what the API
says, and what the keys do is checked through the API.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from opmas.v1 import agents_pb2 as pb

from .harness import OPMASCTL, Sandbox, create, pid_alive, sleeper, wait_state

ROOT = Path(__file__).resolve().parents[2]
TMUX = "/usr/bin/tmux"


class Terminal:
    """A private tmux server with one 160x40 window that runs a command."""

    def __init__(self, workdir: Path) -> None:
        self.socket_name = f"opmas-top-{uuid.uuid4().hex[:10]}"
        self.exit_file = workdir / "exit-status"
        self.pids: list[int] = []
        self.socket_path: Path | None = None

    def tmux(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [TMUX, "-L", self.socket_name, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def run(self, argv: list[str], env: dict[str, str]) -> None:
        """Runs argv in the window; its exit status goes to exit_file, then the window stays
        (a sleep) so that what it printed last can still be read. A window already there is
        closed first."""
        self.tmux("kill-session", "-t", "top", check=False)
        self.exit_file.unlink(missing_ok=True)
        script = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(self.exit_file))}; exec sleep 120"
        # The server is started by this first command and keeps its environment for the window.
        env = {**env, "TERM": "xterm-256color", "LANG": "C.UTF-8"}
        self.tmux("new-session", "-d", "-x", "160", "-y", "40", "-s", "top", "-c", str(ROOT), script, env=env)
        self.pids.append(int(self.tmux("display-message", "-p", "-t", "top", "#{pid}")))
        self.socket_path = Path(self.tmux("display-message", "-p", "#{socket_path}").strip())
        self.pids.append(int(self.tmux("display-message", "-p", "-t", "top", "#{pane_pid}")))

    def screen(self, escapes: bool = False) -> str:
        # -J: a long line (an error message) comes back whole, not cut at the window's width;
        # -e: with the colours, as SGR sequences.
        return self.tmux("capture-pane", "-p", "-J", *(["-e"] if escapes else []), "-t", "top")

    def wait_screen(self, predicate: Callable[[str], object], what: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; screen:\n{text}")
            time.sleep(0.1)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def exit_status(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while not (self.exit_file.exists() and self.exit_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the command did not end within {timeout:g}s; screen:\n{self.screen()}")
            time.sleep(0.05)
        return int(self.exit_file.read_text())

    def close(self) -> None:
        self.tmux("kill-server", check=False)
        deadline = time.monotonic() + 5
        while any(pid_alive(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.socket_path is not None:  # tmux leaves it behind
            self.socket_path.unlink(missing_ok=True)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    try:
        yield term
    finally:
        term.close()


def top(box: Sandbox, terminal: Terminal, env: dict[str, str] | None = None) -> None:
    terminal.run([*OPMASCTL, "--server", str(box.socket), "top"], box.client_env(env))


def rows(screen: str) -> dict[str, list[str]]:
    """The table's rows by agent id: the cells of each line that begins with an id."""
    found: dict[str, list[str]] = {}
    for line in screen.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and re.fullmatch(r"[a-z][a-z0-9-]*", cells[0]) and len(cells) >= 5:
            found[cells[0]] = cells
    return found


def order(screen: str) -> list[str]:
    return list(rows(screen))


def shows(**states: str) -> Callable[[str], bool]:
    """A screen where each agent's row has that state ("gone": no row)."""

    def check(screen: str) -> bool:
        table = rows(screen)
        for agent_id, state in states.items():
            if state == "gone":
                if agent_id in table:
                    return False
            elif agent_id not in table or table[agent_id][1] != state:
                return False
        return True

    return check


def test_top_shows_the_agents_and_follows_the_daemon_without_a_key(
    make_sandbox: Callable[..., Sandbox], terminal: Terminal
) -> None:
    box = make_sandbox()
    box.start()
    create(box.stub, "alpha", sleeper(), start=True)
    create(box.stub, "bravo", sleeper())
    create(box.stub, "charlie", sleeper(), start=True)
    top(box, terminal)

    screen = terminal.wait_screen(
        shows(alpha="running", bravo="stopped", charlie="running"), "the three agents with their states"
    )
    for header in ("ID", "STATE", "PID", "UPTIME", "RESTARTS", "CPU%", "MEMORY", "LAST HEARTBEAT"):
        assert header in screen, screen
    pid = str(box.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id="alpha"), timeout=10).pid)
    assert rows(screen)["alpha"][2] == pid, screen
    # CPU and memory come from GetAgentMetrics, sampled every ~2 s.
    terminal.wait_screen(lambda s: "iB" in rows(s)["alpha"][6], "alpha's memory", timeout=8)

    # Changes made elsewhere show up by themselves: a stop (event), a new running agent (event
    # for an unknown id), a new stopped agent and a deletion (the periodic listing).
    box.stub.StopAgent(pb.StopAgentRequest(agent_id="charlie"), timeout=15)
    terminal.wait_screen(shows(charlie="stopped"), "charlie stopped", timeout=3)
    create(box.stub, "echo", sleeper(), start=True)
    terminal.wait_screen(shows(echo="running"), "echo, registered and started meanwhile", timeout=3)
    create(box.stub, "delta", sleeper())
    box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="bravo"), timeout=15)
    terminal.wait_screen(shows(delta="stopped", bravo="gone"), "delta added, bravo gone", timeout=12)

    terminal.keys("q")
    assert terminal.exit_status() == 0


def test_top_keys_stop_start_sort_show_logs_and_quit(
    make_sandbox: Callable[..., Sandbox], terminal: Terminal
) -> None:
    box = make_sandbox()
    box.start()
    create(box.stub, "alpha", sleeper(), start=True)
    create(box.stub, "bravo", sleeper(), start=True)
    top(box, terminal)
    screen = terminal.wait_screen(shows(alpha="running", bravo="running"), "both running")
    assert order(screen) == ["alpha", "bravo"], screen  # by ID, the cursor on the first row

    terminal.keys("x")
    wait_state(box.stub, "alpha", pb.AGENT_STATE_STOPPED)
    terminal.wait_screen(lambda s: shows(alpha="stopped")(s) and "agent alpha stopped" in s, "the stop")
    assert box.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id="bravo"), timeout=10).pid, "bravo"
    terminal.keys("S")
    wait_state(box.stub, "alpha", pb.AGENT_STATE_RUNNING)
    terminal.wait_screen(shows(alpha="running"), "alpha running again")

    terminal.keys("r")
    terminal.wait_screen(lambda s: order(s) == ["bravo", "alpha"] and "ID ▼" in s, "the order reversed")
    terminal.keys("2")  # STATE, then the id: both running
    terminal.wait_screen(lambda s: order(s) == ["alpha", "bravo"] and "STATE ▲" in s, "sorted by state")
    box.stub.StopAgent(pb.StopAgentRequest(agent_id="alpha"), timeout=15)
    terminal.wait_screen(lambda s: order(s) == ["bravo", "alpha"], "running before stopped")

    # The cursor stayed on alpha through the re-sorting: its logs.
    terminal.keys("l")
    terminal.wait_screen(lambda s: "logs of alpha" in s and "hello from alpha" in s, "alpha's logs")
    # The table's keys do nothing over the logs: a stop would have put "stop alpha…" in the
    # status line at once (and then "already stopped"), where "agent alpha started" still is.
    terminal.keys("x")
    terminal.keys("Escape")
    screen = terminal.wait_screen(lambda s: "alpha" in rows(s), "the table again")
    assert "agent alpha started" in screen and "stop alpha" not in screen, screen

    terminal.keys("q")
    assert terminal.exit_status() == 0


def test_top_shows_why_an_operation_failed(make_sandbox: Callable[..., Sandbox], terminal: Terminal) -> None:
    box = make_sandbox()
    box.start()
    script = box.root / "vanishing.sh"
    script.write_text("#!/bin/sh\nexec sleep 1000\n")
    script.chmod(0o755)
    create(box.stub, "alpha", [str(script)])
    script.unlink()  # StartAgent now fails: FAILED_PRECONDITION
    top(box, terminal)
    terminal.wait_screen(shows(alpha="stopped"), "alpha")
    terminal.keys("S")
    screen = terminal.wait_screen(lambda s: "start alpha failed: " in s, "the error in the status line")
    assert "failed_precondition" in screen and "vanishing.sh" in screen, screen
    terminal.keys("q")
    assert terminal.exit_status() == 0


def test_top_shows_the_daemon_gone_and_comes_back_with_it(
    make_sandbox: Callable[..., Sandbox], terminal: Terminal
) -> None:
    box = make_sandbox()
    box.start()
    create(box.stub, "alpha", sleeper(), start=True)
    top(box, terminal)
    terminal.wait_screen(shows(alpha="running"), "alpha")

    assert box.daemon.stop() == 0
    terminal.wait_screen(lambda s: "disconnected: " in s, "the disconnection", timeout=5)
    box.start()
    terminal.wait_screen(
        lambda s: "disconnected" not in s and shows(alpha="running")(s), "reconnected", timeout=10
    )
    # Live again, not a stale picture: a change after the reconnection shows.
    box.stub.StopAgent(pb.StopAgentRequest(agent_id="alpha"), timeout=15)
    terminal.wait_screen(shows(alpha="stopped"), "alpha stopped", timeout=5)

    terminal.keys("C-c")
    assert terminal.exit_status() == 130


def _grey(sgr: str) -> bool:
    """Whether an SGR foreground (`5;N` of the 256 colours, or `2;R;G;B`) is a grey."""
    parts = [int(p) for p in sgr.split(";")]
    if parts[0] == 2:
        return parts[1] == parts[2] == parts[3]
    n = parts[1]
    if n >= 232 or n in (0, 7, 8, 15):
        return True
    if 16 <= n <= 231:
        r, g, b = (n - 16) // 36, (n - 16) // 6 % 6, (n - 16) % 6
        return r == g == b
    return False


def state_colour(screen: str, state: str) -> str:
    match = re.search(r"\x1b\[(?:[0-9;]*;)?38;((?:5;\d+)|(?:2;\d+;\d+;\d+))(?:;[0-9;]*)?m" + state, screen)
    assert match, f"no colour before {state!r}: {screen!r}"
    return match.group(1)


def test_top_colours_the_state_unless_no_color(
    make_sandbox: Callable[..., Sandbox], terminal: Terminal
) -> None:
    box = make_sandbox()
    box.start()
    # The cursor's row has the cursor's colours: the running agent goes on the second row.
    create(box.stub, "alpha", sleeper())
    create(box.stub, "bravo", sleeper(), start=True)
    top(box, terminal)
    terminal.wait_screen(shows(alpha="stopped", bravo="running"), "bravo running")
    assert not _grey(state_colour(terminal.screen(escapes=True), "running"))
    terminal.keys("q")
    assert terminal.exit_status() == 0

    top(box, terminal, env={"NO_COLOR": "1"})
    terminal.wait_screen(shows(bravo="running"), "bravo without colour")  # the state is still written
    assert _grey(state_colour(terminal.screen(escapes=True), "running"))
    terminal.keys("q")
    assert terminal.exit_status() == 0


def test_top_reports_an_unreachable_daemon_as_other_commands_do(tmp_path: Path, terminal: Terminal) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPMAS_")}
    missing = str(tmp_path / "nobody.sock")
    listing = subprocess.run(
        [*OPMASCTL, "--server", missing, "agents", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode != 0, listing
    terminal.run([*OPMASCTL, "--server", missing, "top"], env)
    assert terminal.exit_status(timeout=30) == listing.returncode
    first_line = listing.stderr.splitlines()[0]
    # No full screen: the same error on the terminal, where the shell left it.
    terminal.wait_screen(lambda s: first_line in s, "the error", timeout=5)


def test_top_refuses_without_a_terminal(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPMAS_")}
    result = subprocess.run(
        [*OPMASCTL, "--server", str(tmp_path / "opmasd.sock"), "top"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert "needs a terminal" in result.stderr and "agents list" in result.stderr, result.stderr
    assert result.stdout == ""
