"""Socket activation of the REST port, with the real `systemd-socket-activate` (it passes
LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES as PID 1 does, then execs opmasd in its own process):
the first connection starts opmasd and is answered on the passed socket; a passed socket that
is not rest.address stops the start with a message naming the field."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .harness import Daemon, Sandbox, free_port, spawn


def _activator(box: Sandbox, listen: str, rest_address: str) -> tuple[subprocess.Popen[bytes], Path]:
    """systemd-socket-activate listening on `listen`, set to exec opmasd with REST on rest_address."""
    binary = shutil.which("systemd-socket-activate")
    if binary is None:
        pytest.fail("systemd-socket-activate is needed (apt-get install systemd)")
    env = box.env(OPMAS_REST_ENABLED="true", OPMAS_REST_ADDRESS=rest_address)
    # It passes its children only what -E names (and PATH, HOME, TERM).
    setenv = [f"--setenv={key}={value}" for key, value in env.items()]
    opmasd = [sys.executable, "-m", "opmasd", "--config", str(box.config_file)]
    stderr_path = box.root / f"opmasd-{len(box.daemons) + 1}.stderr"
    with open(stderr_path, "wb") as stderr:
        popen = spawn(
            [binary, f"--listen={listen}", "--fdname=rest", *setenv, "--", *opmasd],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            cwd=box.root,
            start_new_session=True,
        )
    box.daemons.append(Daemon(box, popen, stderr_path))  # same process once it execs opmasd
    deadline = time.monotonic() + 30
    while b"Listening on" not in stderr_path.read_bytes():
        assert popen.poll() is None, stderr_path.read_text()
        assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
        time.sleep(0.02)
    return popen, stderr_path


def test_the_first_connection_starts_opmasd_and_is_answered(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    box = make_sandbox("socket-activation")
    port = free_port()
    _, stderr_path = _activator(box, f"127.0.0.1:{port}", f"127.0.0.1:{port}")
    assert b"opmasd" not in stderr_path.read_bytes(), "opmasd started before any connection"
    # The connection waits in the passed socket's backlog while opmasd starts.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as reply:
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "alive"}
    box.daemon.wait_ready()
    events = box.daemon.log_events()
    adopted = [e for e in events if e.get("event") == "REST adopts the socket systemd passed"]
    assert adopted and adopted[0]["socket"] == f"127.0.0.1:{port} (fd 3, rest)", events
    serving = next(e for e in events if e.get("event") == "HTTP serving")
    assert serving["port"] == port and serving["passed_by_systemd"] is True
    # Still the one listener (no second bind): a later connection is served as well.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as reply:
        assert reply.status == 200
    assert box.daemon.stop() == 0


def test_a_passed_socket_that_is_not_rest_address_stops_the_start(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    box = make_sandbox("socket-activation-mismatch")
    port, configured = free_port(), free_port()
    popen, stderr_path = _activator(box, f"127.0.0.1:{port}", f"127.0.0.1:{configured}")
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        assert popen.wait(60) == 2  # a configuration error: systemd does not restart it
    text = stderr_path.read_text()
    assert "rest.address" in text and f"it is not the configured 127.0.0.1:{configured}" in text, text
