"""opmasctl's exit statuses, each seen from a process against a real opmasd (README "Exit status"):
0 done, 1 the daemon refused or failed the request (DEADLINE_EXCEEDED included) or the agent
answered with an error, 2 usage, 3 not found, 4 unavailable (no daemon, or UNAVAILABLE),
130 interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from .harness import OPMASCTL, Sandbox, create, sandbox, sleeper, spawn
from .test_nats import probe_package, start

pytestmark = pytest.mark.timeout(60)

PROBE = "exit-probe"  # an SDK agent: answers `echo`, fails `fail`


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("opmasctl-exit-codes") as b:
        probe_package(b.agents_dir, PROBE)
        b.start()
        start(b.stub, PROBE)
        yield b


def exits(box: Sandbox, code: int, *args: str, server: str | None = "") -> subprocess.CompletedProcess[str]:
    result = box.opmasctl(*args, server=server)
    assert result.returncode == code, (
        f"opmasctl {' '.join(args)}: exit {result.returncode}, not {code}\n{result.stdout}\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_0_done(box: Sandbox) -> None:
    assert PROBE in exits(box, 0, "agents", "list", "-o", "name").stdout.split()
    exits(box, 0, "agents", "command", PROBE, "echo", "--param", "x=1")


def test_1_the_daemon_refused_the_request(box: Sandbox) -> None:
    refused = exits(box, 1, "agents", "register", "--name", "x", "--id", "Bad Id", "--command", "true")
    assert "invalid_argument" in refused.stderr


def test_1_the_agent_answered_with_an_error(box: Sandbox) -> None:
    failed = exits(box, 1, "agents", "command", PROBE, "fail", "--param", "why=asked")
    assert "asked to fail: asked" in failed.stderr


def test_1_deadline_exceeded(box: Sandbox) -> None:
    """Not 4: the daemon is there (a hung one: its socket still takes connections), and a call
    that ran out of time may have been carried out."""
    os.kill(box.daemon.pid, signal.SIGSTOP)
    try:
        late = exits(box, 1, "agents", "list", "--timeout", "0.5")
    finally:
        os.kill(box.daemon.pid, signal.SIGCONT)
    assert "deadline_exceeded" in late.stderr and "--timeout SECONDS waits longer" in late.stderr
    assert "cannot reach" not in late.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("agents", "frobnicate"),
        ("agents", "list", "--state", "sleepy"),
        ("agents", "register", "--name", "no-command"),
        ("-o", "name", "agents", "logs", PROBE),
        ("--server", "ftp://127.0.0.1:21", "agents", "list"),
    ],
)
def test_2_usage(box: Sandbox, args: tuple[str, ...]) -> None:
    assert "error:" in exits(box, 2, *args).stderr


@pytest.mark.parametrize(
    "args", [("agents", "get", "no-such"), ("agents", "stop", "no-such"), ("agents", "watch", "no-such")]
)
def test_3_not_found(box: Sandbox, args: tuple[str, ...]) -> None:
    assert "not_found" in exits(box, 3, *args).stderr


def test_4_no_daemon_answers(box: Sandbox) -> None:
    dead = str(box.root / "nobody.sock")
    result = exits(box, 4, "agents", "list", server=dead)
    assert result.stderr.startswith(f"error: cannot reach opmasd at {dead}: no such socket\n")
    assert "make run" in result.stderr and "systemctl start opmasd" in result.stderr
    assert "unavailable" not in result.stderr  # not grpc's own words


def test_4_the_daemon_goes_away(make_sandbox: Callable[..., Sandbox]) -> None:
    """UNAVAILABLE from the daemon itself: its own words, not "cannot reach" (it was reached)."""
    other = make_sandbox()
    other.start()
    create(other.stub, "here", sleeper())
    watcher = spawn(
        [*OPMASCTL, "--server", str(other.socket), "agents", "watch"],
        env=other.client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None and "here" in watcher.stdout.readline()  # subscribed
        assert other.daemon.stop() == 0
        assert watcher.wait(10) == 4
        assert watcher.stderr is not None
        assert watcher.stderr.read() == "error: unavailable: opmasd is shutting down\n"
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_130_interrupted(box: Sandbox) -> None:
    watcher = spawn(
        [*OPMASCTL, "--server", str(box.socket), "agents", "watch", PROBE],
        env=box.client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None and PROBE in watcher.stdout.readline()
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 130
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
