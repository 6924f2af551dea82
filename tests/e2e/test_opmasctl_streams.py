"""`opmasctl agents watch` and `logs --follow` as a user runs them: the current state first,
an unknown id refused at once, Ctrl-C ending with 130, and the daemon going away reported as
an error instead of a quiet exit 0."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

from opmas.v1 import agents_pb2 as pb

from .harness import OPMASCTL, Sandbox, create, sleeper, spawn


def opmasctl(box: Sandbox, *args: str) -> subprocess.Popen[str]:
    return spawn(
        [*OPMASCTL, "--server", str(box.socket), *args],
        env=box.client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Lines:
    """A process's output lines as they come (unbuffered reads: a line that arrived with an
    earlier one is not left waiting in a file object's buffer)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._fd = process.stdout.fileno()
        self._pending = b""

    def read(self, count: int, timeout: float = 15) -> list[str]:
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while len(lines) < count:
            while b"\n" in self._pending and len(lines) < count:
                line, self._pending = self._pending.split(b"\n", 1)
                lines.append(line.decode())
            if len(lines) == count:
                break
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {lines} within {timeout}s"
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 65536)
                assert chunk, f"the output ended after {lines}"
                self._pending += chunk
        return lines


def ended(process: subprocess.Popen[str], timeout: float = 10) -> tuple[int, str]:
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return code, process.stderr.read() if process.stderr else ""


def test_watch_shows_the_current_state_then_changes_and_ctrl_c_is_130(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    box = make_sandbox()
    box.start()
    create(box.stub, "watched", sleeper(), start=True)
    create(box.stub, "other", sleeper())
    watcher = opmasctl(box, "agents", "watch", "watched")
    output = Lines(watcher)
    try:
        first = output.read(1)[0]
        # What it is now, at once: from no state to running, with why it is running.
        assert "watched" in first and "→ running" in first and "started" in first, first
        box.stub.StopAgent(pb.StopAgentRequest(agent_id="watched"), timeout=15)
        box.stub.StartAgent(pb.StartAgentRequest(agent_id="other"), timeout=15)
        changes = output.read(2)
        assert all("watched" in line for line in changes), changes  # only what it watches
        assert "running → stopping" in changes[0] and "stopping → stopped" in changes[1], changes
        box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="watched"), timeout=15)
        (gone,) = output.read(1)
        assert "watched  deleted  deleted by operator" in gone, gone
    finally:
        watcher.send_signal(signal.SIGINT)
    code, err = ended(watcher)
    assert code == 130, err


def test_watch_of_an_unknown_agent_fails_at_once(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    code, err = ended(opmasctl(box, "agents", "watch", "nobody-here"))
    assert code == 3 and "nobody-here" in err and "not found" in err, (code, err)


def test_streams_end_with_an_error_when_the_daemon_goes_away(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    create(box.stub, "talker", sleeper(), start=True)
    watcher = opmasctl(box, "agents", "watch")
    follower = opmasctl(box, "agents", "logs", "talker", "--follow")
    try:
        Lines(watcher).read(1)  # subscribed: the current state came through
        Lines(follower).read(1)  # the agent's hello
        assert box.daemon.stop() == 0
        for process in (watcher, follower):
            code, err = ended(process)
            # UNAVAILABLE: exit 4, as for any daemon that cannot serve (README "Exit status").
            assert code == 4 and "shutting down" in err, (code, err)
    finally:
        for process in (watcher, follower):
            if process.poll() is None:
                process.kill()
                process.wait()
