"""opmasd as systemd runs it: sd_notify phases, watchdog, SIGHUP reload + rescan, SIGTERM.

Self-contained on purpose: the daemon gets a NOTIFY_SOCKET bound by the test, so the
datagrams systemd would receive are read here and checked in order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import agents_pb2_grpc


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, because a unix socket path must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="opmn"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def write_agent(agents: Path, name: str, autostart: bool = True) -> None:
    folder = agents / name
    folder.mkdir(parents=True)
    (folder / "agent.yaml").write_text(
        f"name: {name}\nentrypoint: sleep 1000\nstop_timeout: 2s\nautostart: {str(autostart).lower()}\n"
    )


def read_messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams until one contains `until`; each datagram's lines, in order."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536).decode()
        except TimeoutError:
            break
        messages.extend(data.splitlines())
        if until in data.splitlines():
            return messages
    raise AssertionError(f"no {until!r} within {timeout}s; got {messages}")


def test_notify_phases_reload_and_watchdog(workdir: Path) -> None:
    agents = workdir / "agents"
    agents.mkdir()
    write_agent(agents, "first")
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": "400000",
        "OPMAS_SERVICE_STATE_DIR": str(workdir / "state"),
        "OPMAS_SERVICE_RUNTIME_DIR": str(workdir / "run"),
        "OPMAS_SERVICE_LOG_DIR": str(workdir / "log"),
        "OPMAS_AGENTS_DIRS": str(agents),
        "OPMAS_GRPC_ADDRESS": "",
        "OPMAS_SERVICE_LOG_FORMAT": "json",
    }
    stderr = open(workdir / "stderr.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "opmasd"], env=env, stderr=stderr)
    channel = grpc.insecure_channel(f"unix://{workdir / 'run' / 'opmasd.sock'}")
    try:
        startup = read_messages(notify, "READY=1", 20)
        # READY only once the API answers: the socket serves at the moment READY arrives.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert any(line.startswith("STATUS=") for line in startup)
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        assert [a.agent_id for a in stub.ListAgents(pb.ListAgentsRequest(), timeout=5).agents] == ["first"]

        # The watchdog is fed from the event loop, at WATCHDOG_USEC / 2.
        assert "WATCHDOG=1" in read_messages(notify, "WATCHDOG=1", 2)

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), the new package is found, READY=1 again.
        write_agent(agents, "second", autostart=False)
        daemon.send_signal(signal.SIGHUP)
        reload_messages = read_messages(notify, "READY=1", 10)
        assert "RELOADING=1" in reload_messages
        assert any(line.startswith("MONOTONIC_USEC=") for line in reload_messages)
        ids = [a.agent_id for a in stub.ListAgents(pb.ListAgentsRequest(), timeout=5).agents]
        assert ids == ["first", "second"]

        first_pid = stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id="first"), timeout=5).pid
        assert first_pid > 0
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in read_messages(notify, "STOPPING=1", 10)
        assert daemon.wait(timeout=15) == 0
        # Graceful shutdown stops the agents it runs.
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)
    finally:
        channel.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        stderr.close()
        notify.close()


def test_bad_config_exits_with_file_key_and_reason(workdir: Path) -> None:
    config = workdir / "opmasd.yaml"
    config.write_text("agents:\n  max_restarts: lots\n")
    result = subprocess.run(
        [sys.executable, "-m", "opmasd", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert str(config) in result.stderr and "agents.max_restarts" in result.stderr


@pytest.mark.parametrize("shared", ["state_dir", "socket"])
def test_second_daemon_refuses_to_start(workdir: Path, shared: str) -> None:
    env = {
        **os.environ,
        "OPMAS_SERVICE_STATE_DIR": str(workdir / "state"),
        "OPMAS_SERVICE_RUNTIME_DIR": str(workdir / "run"),
        "OPMAS_SERVICE_LOG_DIR": str(workdir / "log"),
        "OPMAS_AGENTS_DIRS": str(workdir / "none"),
        "OPMAS_GRPC_ADDRESS": "",
    }
    first = subprocess.Popen([sys.executable, "-m", "opmasd"], env=env, stderr=subprocess.DEVNULL)
    try:
        sock = workdir / "run" / "opmasd.sock"
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env2 = dict(env)
        if shared == "socket":
            env2["OPMAS_SERVICE_STATE_DIR"] = str(workdir / "state2")
            expected = "in use by a running opmasd"
        else:
            env2["OPMAS_SERVICE_RUNTIME_DIR"] = str(workdir / "run2")
            expected = f"another opmasd (pid {first.pid}) is running"
        second = subprocess.run(
            [sys.executable, "-m", "opmasd"], env=env2, capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1
        assert expected in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(timeout=15)
