"""The NATS side of a real opmasd: a real nats-server (embedded or external), real agents (an SDK
agent written here, the shipped detectors, the bash probe), real gRPC and a plain nats-py client.

- heartbeats drive running ↔ inactive, and restart_on_inactive replaces a silent agent;
- SendCommand round trips, times out naming the agent, refuses a stopped agent;
- GetAgentMetrics merges process metrics with what the agent last reported;
- the manager subjects answer every command in the §5 shape, the query subject refuses
  mutations, a custom subject prefix is honoured, NATS micro discovery finds "opmasd";
- a barrage of malformed messages is counted, logged boundedly, and harms nothing;
- a NATS outage (embedded server killed, external server stopped, or down at start) never stops
  or restarts an agent, and everything recovers when NATS is back;
- the shipped detectors find what the sample log holds; the bash agent is monitored like any.

One daemon serves most tests (each with agents of its own); the tests that kill NATS, change
the subject prefix or flood the daemon get their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import nats.errors
import pytest
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opmas.v1 import agents_pb2 as pb
from opmas.v1.agents_pb2_grpc import AgentServiceStub

from .harness import (
    ExternalNats,
    Sandbox,
    call_error,
    create,
    kill_pid,
    pid_alive,
    proc_cmdline,
    proc_environ,
    sandbox,
    sleeper,
    spawn,
    status,
    subscribed_events,
    wait_for,
    wait_state,
    write_package,
)
from .nats_client import NatsClient

pytestmark = pytest.mark.timeout(90)

RUNNING = pb.AGENT_STATE_RUNNING
STOPPED = pb.AGENT_STATE_STOPPED
INACTIVE = pb.AGENT_STATE_INACTIVE
HEARTBEAT_TIMEOUT = 1.0
FAST = {"OPMAS_NATS_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT)}
REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "agents" / "packages"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
RESPONSE_KEYS = {"status", "command", "agent_id", "result", "error", "timestamp"}

# An SDK agent: a setting turned into a metric, a custom command with params, one that fails.
PROBE_AGENT = '''
"""e2e probe: an SDK agent with custom commands."""

from __future__ import annotations

from typing import Any

from opmas_agent import Agent, CommandError, command, run


class Probe(Agent):
    default_id = "e2e-probe"

    async def setup(self) -> None:
        self.metrics["probe_value"] = self.setting("PROBE_VALUE", 42)
        self.metrics["echoes"] = 0

    @command
    def echo(self, params: dict[str, Any]) -> dict[str, Any]:
        self.metrics["echoes"] += 1
        return {"params": params, "agent_id": self.agent_id}

    @command("fail")
    def _fail(self, params: dict[str, Any]) -> None:
        raise CommandError(f"asked to fail: {params.get('why', '')}")


if __name__ == "__main__":
    run(Probe)
'''


def probe_package(parent: Path, agent_id: str, **manifest: Any) -> Path:
    """The SDK probe as a package (`entrypoint: {module: e2e_probe}`), heartbeating every 0.2 s."""
    folder = write_package(
        parent,
        agent_id,
        {
            "name": agent_id,
            "id": agent_id,
            "type": "probe",
            "version": "1.2.3",
            "entrypoint": {"module": "e2e_probe"},
            "environment": {"PROBE_VALUE": "42"},
            "restart_policy": "on-failure",
            "stop_timeout": "2s",
            "heartbeat_interval": "0.2s",
            **manifest,
        },
    )
    module = folder / "e2e_probe"
    module.mkdir()
    (module / "__init__.py").write_text("")
    (module / "__main__.py").write_text(PROBE_AGENT)
    return folder


def shipped_package(
    parent: Path, folder: str, environment: dict[str, str] | None = None, **manifest: Any
) -> Path:
    """A copy of a shipped package whose manifest is amended (environment merged, keys replaced)."""
    target = parent / folder
    shutil.copytree(SHIPPED / folder, target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / "agent.yaml"
    data = yaml.safe_load(path.read_text())
    data["environment"] = {**(data.get("environment") or {}), **(environment or {})}
    data.update(manifest)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def start(stub: AgentServiceStub, agent_id: str) -> pb.AgentStatus:
    """Start an agent and wait until its first heartbeat since this start was taken."""
    stub.StartAgent(pb.StartAgentRequest(agent_id=agent_id), timeout=15)
    return wait_state(stub, agent_id, RUNNING, timeout=15, check=heard_since_start)


def stop(stub: AgentServiceStub, agent_id: str) -> pb.StopAgentResponse:
    response: pb.StopAgentResponse = stub.StopAgent(pb.StopAgentRequest(agent_id=agent_id), timeout=20)
    return response


def heard_since_start(s: pb.AgentStatus) -> bool:
    return (
        s.HasField("last_heartbeat_time")
        and s.last_heartbeat_time.ToNanoseconds() >= s.start_time.ToNanoseconds()
    )


def heard_after(
    stub: AgentServiceStub, agent_id: str, after_ns: int, timeout: float = 10.0
) -> pb.AgentStatus:
    """Wait for a heartbeat taken after after_ns (time.time_ns of the daemon's clock = ours)."""

    def heard() -> pb.AgentStatus | None:
        s = status(stub, agent_id)
        return s if s.last_heartbeat_time.ToNanoseconds() > after_ns else None

    return wait_for(heard, timeout, what=f"a heartbeat of {agent_id}")


def send(
    stub: AgentServiceStub,
    agent_id: str,
    command: str,
    params: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> pb.SendCommandResponse:
    request = pb.SendCommandRequest(agent_id=agent_id, command=command)
    request.timeout.FromNanoseconds(int(timeout * 1e9))
    if params:
        request.params.update(params)
    response: pb.SendCommandResponse = stub.SendCommand(request, timeout=timeout + 10)
    return response


def result_of(response: pb.SendCommandResponse) -> Any:
    return json_format.MessageToDict(response.result)


def events_of(reader: Any, agent_id: str) -> list[tuple[int, int, str]]:
    return [(e.previous_state, e.state, e.reason) for e in reader.snapshot() if e.agent_id == agent_id]


def check_response(reply: Any, command: str, agent_id: str = "") -> dict[str, Any]:
    """A §5 response: every key present, the command and agent echoed, an RFC 3339 UTC time."""
    assert isinstance(reply, dict), reply
    assert RESPONSE_KEYS <= set(reply), reply
    assert reply["status"] in ("success", "error"), reply
    assert reply["command"] == command, reply
    assert reply["agent_id"] == agent_id, reply
    assert RFC3339_UTC.match(reply["timestamp"]), reply["timestamp"]
    if reply["status"] == "success":
        assert reply["error"] is None, reply
    else:
        assert isinstance(reply["error"], str) and reply["error"], reply
    return reply


def healthy(box: Sandbox) -> None:
    """The daemon is alive and answers gRPC: health SERVING and a ListAgents."""
    assert box.daemon.running
    health = health_pb2_grpc.HealthStub(box.daemon.channel())
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    box.stub.ListAgents(pb.ListAgentsRequest(), timeout=5)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("nats", env=FAST) as b:
        probe_package(b.agents_dir, "probe")
        probe_package(b.agents_dir, "cmd-probe")
        probe_package(b.agents_dir, "metrics-probe")
        probe_package(b.agents_dir, "restarter", restart_on_inactive=True, stop_timeout="1s")
        shipped_package(b.agents_dir, "auth-failures")
        shipped_package(
            b.agents_dir, "device-liveness", {"LIVENESS_TIMEOUT": "2", "LIVENESS_CHECK_INTERVAL": "0.5"}
        )
        shipped_package(b.agents_dir, "nats-shell-probe", heartbeat_interval="0.2s")
        b.start()
        yield b


@pytest.fixture
def stub(box: Sandbox) -> AgentServiceStub:
    return box.stub


@pytest.fixture
def client(box: Sandbox) -> NatsClient:
    return box.nats()


# -- heartbeats ---------------------------------------------------------------------------------


def test_heartbeats_drive_running_and_inactive_both_ways(box: Sandbox, stub: AgentServiceStub) -> None:
    reader = subscribed_events(stub, ["probe"])
    try:
        s = start(stub, "probe")
        pid = s.pid
        assert box.agent_pids("probe") == [pid]
        # Heartbeats keep coming: the last-seen time advances.
        heard_after(stub, "probe", s.last_heartbeat_time.ToNanoseconds())
        os.kill(pid, signal.SIGSTOP)
        try:
            silent = wait_state(stub, "probe", INACTIVE, timeout=5 * HEARTBEAT_TIMEOUT)
            assert "no heartbeat" in silent.state_reason, silent.state_reason
            assert silent.pid == pid and pid_alive(pid), "inactive is judged, not acted on"
            os.kill(pid, signal.SIGCONT)
            back = wait_state(stub, "probe", RUNNING, timeout=5)
            assert back.state_reason == "heartbeat received again"
        finally:
            kill_pid(pid, signal.SIGCONT)
        assert back.pid == pid and back.restart_count == 0
        # The stream shows both changes, in order, with their reasons.
        changes = wait_for(
            lambda: (c := events_of(reader, "probe")) and c[-1][:2] == (INACTIVE, RUNNING) and c,
            5,
            what="the inactive -> running event",
        )
        silenced = [reason for prev, state, reason in changes if (prev, state) == (RUNNING, INACTIVE)]
        assert len(silenced) == 1 and "no heartbeat" in silenced[0], changes
        assert changes[-1][2] == "heartbeat received again", changes
    finally:
        reader.cancel()
        stop(stub, "probe")


def test_restart_on_inactive_replaces_a_silent_agent(box: Sandbox, stub: AgentServiceStub) -> None:
    reader = subscribed_events(stub, ["restarter"])
    first = start(stub, "restarter").pid
    os.kill(first, signal.SIGSTOP)
    try:
        # SIGTERM stays pending in a stopped process: after stop_timeout (1 s) it is SIGKILLed.
        replaced = wait_state(
            stub,
            "restarter",
            RUNNING,
            timeout=15,
            check=lambda s: s.pid not in (0, first) and heard_since_start(s),
        )
        wait_for(lambda: not pid_alive(first), 5, what=f"the silent process {first} to be gone")
        assert box.agent_pids("restarter") == [replaced.pid]
        wait_for(
            lambda: any(
                prev == INACTIVE and "restart_on_inactive" in reason
                for prev, _, reason in events_of(reader, "restarter")
            ),
            5,
            what="the restart_on_inactive event",
        )
    finally:
        reader.cancel()
        kill_pid(first, signal.SIGKILL)
        stop(stub, "restarter")


# -- SendCommand and metrics --------------------------------------------------------------------


def test_send_command_round_trip_timeout_and_stopped_agent(box: Sandbox, stub: AgentServiceStub) -> None:
    pid = start(stub, "cmd-probe").pid
    try:
        pong = send(stub, "cmd-probe", "ping")
        assert (pong.agent_id, pong.command, pong.status, pong.error) == ("cmd-probe", "ping", "success", "")
        assert pong.result.string_value == "pong"

        params = {"device": "rtr-1", "count": 3, "flags": [True, None, "x"], "nested": {"a": 1.5}}
        echoed = send(stub, "cmd-probe", "echo", params)
        assert echoed.status == "success", echoed
        assert result_of(echoed) == {"params": params, "agent_id": "cmd-probe"}

        failed = send(stub, "cmd-probe", "fail", {"why": "testing"})
        assert failed.status == "error" and failed.error == "asked to fail: testing", failed
        unknown = send(stub, "cmd-probe", "no-such-command")
        assert unknown.status == "error" and "unknown command" in unknown.error, unknown

        out = box.opmasctl("agents", "command", "cmd-probe", "ping")
        assert (out.returncode, out.stdout) == (0, "pong\n"), out
        out = box.opmasctl("agents", "command", "cmd-probe", "echo", "--param", "n=7", "--param", "who=me")
        assert out.returncode == 0, out
        assert '"n": 7' in out.stdout and '"who": "me"' in out.stdout, out.stdout

        # A stopped (SIGSTOP) agent never answers: DEADLINE_EXCEEDED, naming it, in about 0.5 s.
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            err = call_error(lambda: send(stub, "cmd-probe", "ping", timeout=0.5))
            took = time.monotonic() - began
        finally:
            os.kill(pid, signal.SIGCONT)
        assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "cmd-probe" in err.message and "0.5s" in err.message, err.message
        assert took < 3, f"a 0.5 s command timeout took {took:.1f}s"
        # It answers again once it runs again.
        assert wait_for(lambda: send(stub, "cmd-probe", "ping").result.string_value == "pong", 10)
    finally:
        kill_pid(pid, signal.SIGCONT)
        stop(stub, "cmd-probe")
    err = call_error(lambda: send(stub, "cmd-probe", "ping"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "cmd-probe" in err.message and "not running" in err.message, err.message


def test_metrics_merge_process_and_reported(box: Sandbox, stub: AgentServiceStub) -> None:
    start(stub, "metrics-probe")
    try:

        def reported() -> pb.AgentMetrics | None:
            m: pb.AgentMetrics = stub.GetAgentMetrics(
                pb.GetAgentMetricsRequest(agent_id="metrics-probe"), timeout=5
            )
            return m if "probe_value" in m.reported.fields else None

        metrics = wait_for(reported, 10, what="the agent's reported metrics")
        assert metrics.agent_id == "metrics-probe"
        assert metrics.rss_bytes > 0 and metrics.num_threads >= 1 and metrics.open_fds >= 1
        assert metrics.uptime.ToNanoseconds() > 0
        values = json_format.MessageToDict(metrics.reported)
        assert values["probe_value"] == 42, values  # the manifest's PROBE_VALUE, via the SDK
        assert values["heartbeats"] >= 1 and "uptime_seconds" in values, values
        assert metrics.HasField("reported_time")
        # The agent's own counter, changed by a command, shows up with a later heartbeat.
        send(stub, "metrics-probe", "echo", {"x": 1})

        def echoed() -> bool:
            m = stub.GetAgentMetrics(pb.GetAgentMetricsRequest(agent_id="metrics-probe"), timeout=5)
            return bool(m.reported.fields["echoes"].number_value == 1)

        wait_for(echoed, 5, what="the reported echo count")
    finally:
        stop(stub, "metrics-probe")


# -- the manager subjects and micro discovery ----------------------------------------------------


def test_manager_subjects_round_trip_every_command(
    box: Sandbox, stub: AgentServiceStub, client: NatsClient
) -> None:
    create(stub, "mgr-sleeper", sleeper(), labels={"tier": "mgr"})
    create(stub, "mgr-doomed", sleeper())
    broadcast = client.subscribe("agent.manager.response")

    def manager(
        name: str,
        agent_id: str = "",
        subject: str = "agent.manager.command",
        params: dict[str, Any] | None = None,
    ) -> Any:
        body: dict[str, Any] = {"command": name, "agent_id": agent_id, "params": params or {}}
        return check_response(client.request(subject, body, timeout=20), name, agent_id)

    try:
        listed = manager("list")
        assert listed["status"] == "success", listed
        ids = {a["agent_id"] for a in listed["result"]["agents"]}
        assert {"mgr-sleeper", "mgr-doomed", "probe"} <= ids, ids
        assert listed["result"]["total"] == len(ids)
        only_stopped = manager("list", params={"state": "stopped"})["result"]["agents"]
        assert {a["state"] for a in only_stopped} == {"stopped"}
        labelled = manager("list", params={"label_selector": "tier=mgr"})["result"]["agents"]
        assert [(a["agent_id"], a["labels"]) for a in labelled] == [("mgr-sleeper", {"tier": "mgr"})]
        bad = client.request(
            "agent.manager.command",
            {"command": "list", "agent_id": "", "params": {"label_selector": "tier in ("}},
            timeout=20,
        )
        assert bad["status"] == "error" and "label_selector" in json.dumps(bad), bad

        got = manager("get", "mgr-sleeper")
        assert got["result"]["agent_id"] == "mgr-sleeper" and got["result"]["spec"]["command"][0] == "/bin/sh"
        assert manager("status", "mgr-sleeper")["result"]["state"] == "stopped"

        started = manager("start", "mgr-sleeper")["result"]
        assert started["changed"] is True and started["agent"]["state"] == "running"
        pid = started["agent"]["pid"]
        assert status(stub, "mgr-sleeper").pid == pid > 0 and box.agent_pids("mgr-sleeper") == [pid]

        restarted = manager("restart", "mgr-sleeper")["result"]["agent"]
        assert restarted["state"] == "running" and restarted["pid"] not in (None, pid)
        assert not pid_alive(pid)

        stopped = manager("stop", "mgr-sleeper", params={"timeout": 5})["result"]
        assert stopped["changed"] is True and stopped["agent"]["state"] == "stopped"
        assert status(stub, "mgr-sleeper").state == STOPPED and box.agent_pids("mgr-sleeper") == []

        discovered = manager("discover")["result"]
        assert {"probe", "auth-failures", "nats-shell-probe"} <= {a["agent_id"] for a in discovered["agents"]}
        assert discovered["errors"] == []

        deleted = manager("delete", "mgr-doomed")["result"]
        assert deleted["deleted"] is True
        assert call_error(
            lambda: stub.GetAgent(pb.GetAgentRequest(agent_id="mgr-doomed"), timeout=5)
        ).code == (grpc.StatusCode.NOT_FOUND)

        start(stub, "probe")
        try:
            answered = manager(
                "command", "probe", params={"command": "echo", "params": {"k": "v"}, "timeout": 5}
            )
            assert answered["status"] == "success" and answered["result"] == {
                "params": {"k": "v"},
                "agent_id": "probe",
            }
            refused = manager("command", "probe", params={"command": "fail", "params": {"why": "nats"}})
            assert refused["code"] == "AGENT_ERROR" and refused["error"] == "asked to fail: nats", refused
        finally:
            stop(stub, "probe")

        # Errors carry a code; the query subject reads but never changes anything.
        missing = manager("status", "no-such-agent")
        assert missing["status"] == "error" and missing["code"] == "NOT_FOUND", missing
        for command in ("list", "get", "status"):
            agent_id = "" if command == "list" else "mgr-sleeper"
            assert manager(command, agent_id, subject="agent.manager.query")["status"] == "success"
        for command in ("start", "stop", "restart", "delete", "discover", "command"):
            refused = manager(command, "mgr-sleeper", subject="agent.manager.query")
            assert refused["status"] == "error" and refused["code"] == "INVALID_ARGUMENT", refused
            assert "agent.manager.command" in refused["error"], refused
        assert status(stub, "mgr-sleeper").state == STOPPED, "a refused query changed nothing"

        # Every answer is also broadcast on agent.manager.response.
        wait_for(lambda: any(r.get("command") == "delete" for _, r in broadcast), 5, what="the broadcast")
        for _, reply in broadcast:
            check_response(reply, reply["command"], reply["agent_id"])
    finally:
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="mgr-sleeper"), timeout=15)
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="mgr-doomed"), timeout=15)


def test_micro_discovery_finds_opmasd(client: NatsClient) -> None:
    ping = client.request("$SRV.PING", b"")
    assert ping["name"] == "opmasd" and ping["type"] == "io.nats.micro.v1.ping_response", ping
    info = client.request("$SRV.INFO.opmasd", b"")
    assert info["name"] == "opmasd" and info["metadata"]["subject_prefix"] == "agent", info
    subjects = {e["subject"] for e in info["endpoints"]}
    assert subjects == {"agent.manager.command", "agent.manager.query"}, info
    client.request("agent.manager.query", {"command": "list"})
    stats = client.request("$SRV.STATS.opmasd", b"")
    query = next(e for e in stats["endpoints"] if e["subject"] == "agent.manager.query")
    assert query["data"]["handled"] >= 1, stats


def test_custom_subject_prefix(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox(env={**FAST, "OPMAS_NATS_SUBJECT_PREFIX": "site1"})
    probe_package(box.agents_dir, "probe")
    box.start()
    stub = box.stub
    s = start(stub, "probe")  # its heartbeats on site1.status count
    assert proc_environ(s.pid)["NATS_SUBJECT_PREFIX"] == "site1"
    heard_after(stub, "probe", s.last_heartbeat_time.ToNanoseconds())
    assert send(stub, "probe", "ping").result.string_value == "pong"  # on site1.probe.command

    client = box.nats()
    listed = client.request("site1.manager.query", {"command": "list"})
    assert listed["status"] == "success" and [a["agent_id"] for a in listed["result"]["agents"]] == ["probe"]
    assert (
        client.request("site1.manager.command", {"command": "status", "agent_id": "probe"})["result"]["pid"]
        == s.pid
    )
    with pytest.raises(nats.errors.NoRespondersError):
        client.request("agent.manager.query", {"command": "list"}, timeout=2)
    assert client.request("$SRV.INFO.opmasd", b"")["metadata"]["subject_prefix"] == "site1"
    # A heartbeat on the default prefix is not this installation's: it does not count. The
    # server keeps one publisher's order, so once the later site1 heartbeat (of another agent)
    # is taken, the agent.status one would have been too.
    stop(stub, "probe")
    create(stub, "marker", sleeper())
    before = status(stub, "probe").last_heartbeat_time.ToNanoseconds()
    client.publish("agent.status", {"agent_id": "probe", "status": "running"})
    client.publish("site1.status", {"agent_id": "marker", "status": "running"})
    wait_for(lambda: status(stub, "marker").HasField("last_heartbeat_time"), 5, what="marker's heartbeat")
    assert status(stub, "probe").last_heartbeat_time.ToNanoseconds() == before


# -- malformed input ----------------------------------------------------------------------------

# Each of these is malformed for the subject it is sent to (not merely about an unknown agent).
BAD_COMMON = [
    b"",
    b"   ",
    b"not json",
    b"{",
    b"[1, 2]",
    b"42",
    b"null",
    b'"a string"',
    b"\xff\xfe\x00garbage",
    b'{"agent_id": "x", "status": "running", "metrics": {}, "command": "list", "n": NaN}',
    b"[" * 50_000 + b"]" * 50_000,
]
BAD_STATUS = [
    b'{"status": "running"}',
    b'{"agent_id": 5, "status": "running"}',
    b'{"agent_id": "x"}',
    b'{"agent_id": "", "status": "running"}',
    b'{"agent_id": "x", "status": "running", "timestamp": "yesterday"}',
    b'{"agent_id": "x", "status": "running", "timestamp": 12}',
    b'{"agent_id": "x", "status": "running", "metadata": []}',
]
BAD_METRICS = [
    b'{"agent_id": "x"}',
    b'{"agent_id": "x", "metrics": "lots"}',
    b'{"metrics": {"a": 1}}',
    b'{"agent_id": "x", "metrics": {"a": 1}, "timestamp": "2026-13-45"}',
]
BAD_MANAGER = [
    b'{"agent_id": "x"}',
    b'{"command": 1}',
    b'{"command": "list", "params": []}',
    b'{"command": "frobnicate"}',
    b'{"command": "stop"}',
    b'{"command": "list", "params": {"state": "sleepy"}}',
    b'{"command": "command", "agent_id": "x", "params": {"command": ""}}',
]


def test_malformed_barrage_leaves_the_daemon_healthy(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox(env=FAST)
    box.start()
    stub = box.stub
    create(stub, "target", sleeper(), start=True)
    client = box.nats()
    replies = client.subscribe("_INBOX.barrage.>")
    big = os.urandom(1_000_000)  # below the server's max_payload (1 MiB), above every limit of ours
    plan = {
        "agent.status": BAD_COMMON + BAD_STATUS,
        "agent.metrics": BAD_COMMON + BAD_METRICS,
        "agent.manager.command": BAD_COMMON + BAD_MANAGER,
    }
    messages: list[tuple[str, bytes, str]] = [(subject, big, "") for subject in plan]
    messages[-1] = ("agent.manager.command", big, "_INBOX.barrage.big")
    n = 0
    while len(messages) < 2100:
        for subject, bad in plan.items():
            payload = bad[n % len(bad)]
            reply = f"_INBOX.barrage.{n}" if subject == "agent.manager.command" else ""
            messages.append((subject, payload, reply))
        n += 1
    sent = {subject: sum(1 for s, _, _ in messages if s == subject) for subject in plan}
    client.publish_many(messages)

    # Every manager request with a reply subject got an error reply.
    wait_for(lambda: len(replies) >= sent["agent.manager.command"], 20, what="a reply to every bad request")
    assert len(replies) == sent["agent.manager.command"]
    for subject, reply in replies:
        assert isinstance(reply, dict) and reply["status"] == "error" and reply["error"], (subject, reply)
        assert reply["code"] == "INVALID_ARGUMENT", reply
    big_reply = next(r for s, r in replies if s == "_INBOX.barrage.big")
    assert "too large" in big_reply["error"], big_reply

    # Alive and well: gRPC answers, the agent untouched, a valid heartbeat still counts.
    healthy(box)
    s = status(stub, "target")
    assert s.state == RUNNING and not s.HasField("last_heartbeat_time")
    client.publish("agent.status", {"agent_id": "target", "status": "running", "metadata": {"via": "test"}})
    heard = wait_for(lambda: status(stub, "target").HasField("last_heartbeat_time"), 5, what="the heartbeat")
    assert heard
    # Heard once, then silent: the health check runs as ever and judges it.
    silent = wait_state(stub, "target", INACTIVE, timeout=5 * HEARTBEAT_TIMEOUT)
    assert "no heartbeat" in silent.state_reason
    assert (
        client.request("agent.manager.query", {"command": "status", "agent_id": "target"})["status"]
        == "success"
    )

    # Logged boundedly while it ran; every message counted, as the summaries show at stop.
    malformed_lines = [e for e in box.daemon.log_events() if str(e.get("event", "")).startswith("malformed")]
    assert 0 < len(malformed_lines) <= 3 * len(plan), malformed_lines
    daemon = box.daemon
    stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="target"), timeout=15)
    assert daemon.stop() == 0
    records = daemon.log_events()
    counted: dict[str, int] = {}
    for record in records:
        event = str(record.get("event", ""))
        if event in ("malformed message", "malformed manager request"):
            counted[record["key"]] = counted.get(record["key"], 0) + 1
        elif event in ("malformed message (repeated)", "malformed manager request (repeated)"):
            counted[record["key"]] = counted.get(record["key"], 0) + int(record["more"])
    assert counted == sent, (counted, sent)
    assert len([r for r in records if "malformed" in str(r.get("event"))]) <= 6 * len(plan)
    assert "Traceback" not in daemon.stderr_text()
    assert not [r for r in records if "exception" in r or r.get("level") == "error"], "errors logged"


# -- NATS outages -------------------------------------------------------------------------------


def test_embedded_nats_killed_mid_run(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox(env=FAST)
    # restart_on_inactive: an outage taken for silence would restart it.
    probe_package(box.agents_dir, "probe", restart_on_inactive=True)
    box.start()
    stub = box.stub
    create(stub, "plain", sleeper(), start=True)
    start(stub, "probe")
    reader = subscribed_events(stub, ["probe", "plain"])
    port = box.embedded_nats_port()
    old_server = box.embedded_nats_pid()
    assert old_server, "the embedded nats-server is opmasd's child"
    pids = {agent: status(stub, agent).pid for agent in ("probe", "plain")}

    os.kill(old_server, signal.SIGKILL)
    new_server = wait_for(
        lambda: (pid := box.embedded_nats_pid()) != old_server and pid,
        15,
        what="opmasd to restart its nats-server",
    )
    assert box.embedded_nats_port() == port, "restarted on the same port"
    assert f"--port {port} " in proc_cmdline(new_server), proc_cmdline(new_server)

    # A heartbeat taken from now on came through the new server.
    after = heard_after(stub, "probe", time.time_ns(), timeout=15)
    assert after.state == RUNNING and after.pid == pids["probe"]
    assert wait_for(lambda: send(stub, "probe", "ping").result.string_value == "pong", 10)
    assert box.nats().request("agent.manager.query", {"command": "list"})["status"] == "success"
    # Past the grace period and more: still running, same processes, never a state change.
    time.sleep(2 * HEARTBEAT_TIMEOUT)
    for agent, pid in pids.items():
        s = status(stub, agent)
        assert (s.state, s.pid, s.restart_count) == (RUNNING, pid, 0), (agent, s)
    assert events_of(reader, "probe") == [] and events_of(reader, "plain") == [], reader.snapshot()
    reader.cancel()
    assert any(e.get("event") == "embedded nats-server restarted" for e in box.daemon.log_events())


@pytest.fixture
def external_nats(tmp_path: Path) -> Iterator[ExternalNats]:
    """Requested before make_sandbox, so it is torn down after the daemon stopped."""
    server = ExternalNats(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_external_nats_down_at_start_and_stopped_mid_run(
    external_nats: ExternalNats, make_sandbox: Callable[..., Sandbox]
) -> None:
    box = make_sandbox(env={**FAST, "OPMAS_NATS_URL": external_nats.url})
    probe_package(box.agents_dir, "probe", restart_on_inactive=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(box.root / "notify.sock"))
    notify.settimeout(5)
    # NATS is down: the daemon starts all the same, says READY=1 and serves gRPC.
    with notify:
        box.start(env={"NOTIFY_SOCKET": str(box.root / "notify.sock")})
        while "READY=1" not in notify.recv(65536).decode().splitlines():
            pass
    stub = box.stub
    healthy(box)
    stub.StartAgent(pb.StartAgentRequest(agent_id="probe"), timeout=15)
    pid = wait_state(stub, "probe", RUNNING).pid
    assert proc_environ(pid)["NATS_URL"] == external_nats.url
    err = call_error(lambda: send(stub, "probe", "ping", timeout=1))
    assert err.code == grpc.StatusCode.UNAVAILABLE and "NATS" in err.message, err

    external_nats.start()
    s = wait_state(stub, "probe", RUNNING, timeout=15, check=heard_since_start)
    assert s.pid == pid
    assert wait_for(lambda: send(stub, "probe", "ping").result.string_value == "pong", 10)
    client = box.nats(external_nats.url)
    assert client.request("agent.manager.query", {"command": "list"})["status"] == "success"

    reader = subscribed_events(stub, ["probe"])
    external_nats.stop()
    stopped_at = time.monotonic()
    # Silent for well over heartbeat_timeout: nobody is judged while NATS is down.
    while time.monotonic() - stopped_at < 2.5 * HEARTBEAT_TIMEOUT:
        s = status(stub, "probe")
        assert (s.state, s.pid) == (RUNNING, pid), s
        time.sleep(0.1)
    err = call_error(lambda: send(stub, "probe", "ping", timeout=1))
    assert err.code == grpc.StatusCode.UNAVAILABLE and "NATS is unavailable" in err.message, err

    back_ns = time.time_ns()
    external_nats.start()
    assert external_nats.url == f"nats://127.0.0.1:{external_nats.port}"
    after = heard_after(stub, "probe", back_ns, timeout=15)
    assert (after.state, after.pid, after.restart_count) == (RUNNING, pid, 0)
    assert wait_for(lambda: send(stub, "probe", "ping").result.string_value == "pong", 10)
    assert (
        wait_for(
            lambda: client.request("agent.manager.command", {"command": "status", "agent_id": "probe"})[
                "result"
            ],
            10,
        )["pid"]
        == pid
    )
    assert client.request("$SRV.PING.opmasd", b"")["name"] == "opmasd"
    time.sleep(2 * HEARTBEAT_TIMEOUT)  # the grace period over: still running
    assert status(stub, "probe").state == RUNNING
    assert events_of(reader, "probe") == [], reader.snapshot()
    reader.cancel()
    stop(stub, "probe")


# -- the shipped agents -------------------------------------------------------------------------


def test_shipped_detectors_find_the_sample_incidents(
    box: Sandbox, stub: AgentServiceStub, client: NatsClient
) -> None:
    findings = client.subscribe("findings.>")
    start(stub, "auth-failures")
    start(stub, "device-liveness")
    try:
        replay = spawn(
            [
                sys.executable,
                str(REPO / "agents" / "tools" / "replay_logs.py"),
                str(REPO / "agents" / "samples" / "device-logs.jsonl"),
                "--nats-url",
                box.embedded_nats_url(),
                "--as-fast-as-possible",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = replay.communicate(timeout=30)
        assert replay.returncode == 0, (out, err)

        def silent(device: str) -> dict[str, Any] | None:
            return next(
                (f for _, f in findings if f.get("finding") == "device_silent" and f.get("device") == device),
                None,
            )

        gone = wait_for(lambda: silent("access-sw-3"), 15, what="access-sw-3's device_silent finding")
        assert gone["severity"] == "medium" and gone["last_record_time"] == "2026-03-14T09:02:50.400Z", gone
        auth = [f for s, f in findings if s == "findings.auth"]
        assert len(auth) == 1, auth  # the burst; not the contractor, not the two tries on core-sw-1
        assert (auth[0]["finding"], auth[0]["device"], auth[0]["client"]) == (
            "auth_failures",
            "edge-rtr-1",
            "203.0.113.7",
        ), auth[0]
        assert (
            auth[0]["severity"] == "high" and auth[0]["count"] >= 5 and auth[0]["agent_id"] == "auth-failures"
        )
        stats = send(stub, "auth-failures", "stats")
        assert stats.status == "success", stats
    finally:
        stop(stub, "auth-failures")
        stop(stub, "device-liveness")


def test_bash_agent_is_supervised_and_monitored(box: Sandbox, stub: AgentServiceStub) -> None:
    s = start(stub, "nats-shell-probe")
    pid = s.pid
    assert box.agent_pids("nats-shell-probe") == [pid]
    heard_after(stub, "nats-shell-probe", s.last_heartbeat_time.ToNanoseconds())
    pong = send(stub, "nats-shell-probe", "ping")
    assert pong.status == "success" and pong.result.string_value == "pong", pong
    state = result_of(send(stub, "nats-shell-probe", "status"))
    assert state["implementation"] == "bash" and state["pid"] == pid, state
    metrics = stub.GetAgentMetrics(pb.GetAgentMetricsRequest(agent_id="nats-shell-probe"), timeout=5)
    assert metrics.rss_bytes > 0 and metrics.reported.fields["heartbeats"].number_value >= 1

    os.kill(pid, signal.SIGSTOP)
    try:
        silent = wait_state(stub, "nats-shell-probe", INACTIVE, timeout=5 * HEARTBEAT_TIMEOUT)
        assert "no heartbeat" in silent.state_reason
        os.kill(pid, signal.SIGCONT)
        wait_state(stub, "nats-shell-probe", RUNNING, timeout=5, check=lambda s: s.pid == pid)
    finally:
        kill_pid(pid, signal.SIGCONT)

    began = time.monotonic()
    stopped = stop(stub, "nats-shell-probe")
    took = time.monotonic() - began
    assert stopped.status.state == STOPPED
    assert took < 5, f"stopping took {took:.1f}s, more than its stop_timeout"
    final = status(stub, "nats-shell-probe")
    assert final.last_exit.exit_code == 0 and final.last_exit.signal == 0, final.last_exit
    assert box.agent_pids("nats-shell-probe") == []
