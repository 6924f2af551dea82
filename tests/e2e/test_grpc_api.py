"""Every RPC of AgentService, plus health checking and reflection, against a real opmasd.

One daemon serves the module (each test uses agents of its own); the basic lifecycle runs on a
daemon of its own, once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from opmas.v1 import agents_pb2 as pb
from opmas.v1.agents_pb2_grpc import AgentServiceStub

from .harness import (
    Sandbox,
    StreamReader,
    call_error,
    create,
    pid_alive,
    proc_environ,
    python_agent,
    sandbox,
    sleeper,
    status,
    subscribed_events,
    wait_for,
    wait_state,
    write_package,
)

pytestmark = pytest.mark.timeout(60)

RUNNING = pb.AGENT_STATE_RUNNING
STOPPED = pb.AGENT_STATE_STOPPED

# Prints five numbered lines, then a tick every 0.1 s.
TICKER = python_agent(
    """
    import itertools, time
    for i in range(1, 6):
        print(f"line {i}")
    for n in itertools.count():
        print(f"tick {n}")
        time.sleep(0.1)
    """
)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("grpc-api") as b:
        b.start()
        yield b


@pytest.fixture
def stub(box: Sandbox) -> AgentServiceStub:
    return box.stub


def _delete(stub: AgentServiceStub, *agent_ids: str) -> None:
    for agent_id in agent_ids:
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=15)


# -- health and reflection ----------------------------------------------------------------------


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_health_and_reflection_list_the_service(box: Sandbox, over: str) -> None:
    channel = box.daemon.channel(None if over == "unix" else box.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "opmas.v1.AgentService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter(
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="opmas.v1.AgentService"),
        ]
    )
    replies = list(reflection.ServerReflectionInfo(requests, timeout=5))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"opmas.v1.AgentService", "grpc.health.v1.Health"} <= services
    assert replies[1].file_descriptor_response.file_descriptor_proto, "no descriptor for AgentService"


# -- create, get, list --------------------------------------------------------------------------


def test_create_from_spec_get_and_list_with_filters_and_paging(box: Sandbox, stub: AgentServiceStub) -> None:
    ids = ["page-a", "page-b", "page-c"]
    for agent_id in ids:
        agent = create(stub, agent_id, sleeper(), type="e2e-paging", version="1.2.3", description="paged")
        assert agent.agent_id == agent_id
        assert agent.source == pb.AGENT_SOURCE_REGISTERED
        assert agent.status.state == STOPPED
        assert agent.status.desired_state == pb.DESIRED_STATE_STOPPED
        assert agent.create_time.seconds > 0
    try:
        got = stub.GetAgent(pb.GetAgentRequest(agent_id="page-b"), timeout=5)
        assert got.spec.name == "page-b"
        assert list(got.spec.command) == sleeper()
        assert got.spec.type == "e2e-paging"
        assert got.spec.version == "1.2.3"
        assert got.spec.restart_policy == pb.RESTART_POLICY_ON_FAILURE  # the daemon's default
        assert got.spec.runtime == pb.RUNTIME_KIND_PROCESS
        node = got.node
        assert node == socket.gethostname()

        full = stub.ListAgents(pb.ListAgentsRequest(type="e2e-paging"), timeout=5)
        assert [a.agent_id for a in full.agents] == ids
        assert full.total_size == 3
        assert full.next_page_token == ""

        # One at a time, following the tokens to the end.
        seen: list[str] = []
        request = pb.ListAgentsRequest(type="e2e-paging", page_size=1)
        while True:
            page = stub.ListAgents(request, timeout=5)
            assert len(page.agents) == 1
            assert page.total_size == 3
            seen.append(page.agents[0].agent_id)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        assert seen == ids

        stub.StartAgent(pb.StartAgentRequest(agent_id="page-b"), timeout=10)
        running = stub.ListAgents(pb.ListAgentsRequest(type="e2e-paging", state=RUNNING), timeout=5)
        assert [a.agent_id for a in running.agents] == ["page-b"]
        stopped = stub.ListAgents(pb.ListAgentsRequest(type="e2e-paging", state=STOPPED), timeout=5)
        assert [a.agent_id for a in stopped.agents] == ["page-a", "page-c"]
        on_node = stub.ListAgents(pb.ListAgentsRequest(type="e2e-paging", node=node), timeout=5)
        assert on_node.total_size == 3
        elsewhere = stub.ListAgents(pb.ListAgentsRequest(node="no-such-node"), timeout=5)
        assert list(elsewhere.agents) == [] and elsewhere.total_size == 0

        # The same answers over TCP.
        tcp = box.daemon.tcp_stub()
        over_tcp = tcp.ListAgents(pb.ListAgentsRequest(type="e2e-paging"), timeout=5)
        assert [a.agent_id for a in over_tcp.agents] == ids
    finally:
        _delete(stub, *ids)


def test_create_from_manifest_path(box: Sandbox, stub: AgentServiceStub) -> None:
    package = write_package(
        box.extra_dir,
        "from-manifest",
        {
            "name": "From Manifest",
            "id": "from-manifest",
            "type": "monitor",
            "version": "2.0.0",
            "description": "registered by path",
            "entrypoint": sleeper(),
            "environment": {"GREETING": "hi"},
            "restart_policy": "always",
            "stop_timeout": "3s",
        },
    )
    agent = stub.CreateAgent(pb.CreateAgentRequest(manifest_path=str(package), start=True), timeout=10)
    try:
        assert agent.agent_id == "from-manifest"
        assert agent.source == pb.AGENT_SOURCE_REGISTERED
        assert agent.manifest_path == str(package / "agent.yaml")
        assert agent.spec.name == "From Manifest"
        assert agent.spec.type == "monitor"
        assert agent.spec.version == "2.0.0"
        assert agent.spec.restart_policy == pb.RESTART_POLICY_ALWAYS
        assert agent.spec.stop_timeout.seconds == 3
        assert agent.spec.environment["GREETING"] == "hi"
        assert agent.spec.working_directory == str(package)
        assert agent.status.state == RUNNING and agent.status.pid > 0
        assert box.agent_pids("from-manifest") == [agent.status.pid]
        env = proc_environ(agent.status.pid)
        assert env["GREETING"] == "hi"
        assert env["AGENT_ID"] == "from-manifest"
        assert env["AGENT_NAME"] == "From Manifest"
        assert env["AGENT_TYPE"] == "monitor"
        assert env["AGENT_VERSION"] == "2.0.0"
        assert not [k for k in env if k.startswith("OPMAS_")], "opmasd's own settings leaked to the agent"
    finally:
        _delete(stub, "from-manifest")
    assert box.agent_pids("from-manifest") == []


# -- update -------------------------------------------------------------------------------------


def test_update_with_mask_applies_at_next_start(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "upd", sleeper(), start=True, version="1.0.0", environment={"LEVEL": "one"})
    try:
        pid = status(stub, "upd").pid
        # Only the masked fields change, although the request sets version too.
        request = pb.UpdateAgentRequest(
            agent_id="upd",
            spec=pb.AgentSpec(
                description="updated",
                version="9.9.9",
                environment={"LEVEL": "two"},
                stop_timeout=duration_pb2.Duration(seconds=2),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "environment", "stop_timeout"]),
        )
        agent = stub.UpdateAgent(request, timeout=5)
        assert agent.spec.description == "updated"
        assert agent.spec.version == "1.0.0"
        assert dict(agent.spec.environment) == {"LEVEL": "two"}
        assert agent.spec.stop_timeout.seconds == 2
        assert agent.update_time.ToDatetime() >= agent.create_time.ToDatetime()

        # A running agent keeps its process and its old spec until it is started anew.
        assert status(stub, "upd").pid == pid
        assert proc_environ(pid)["LEVEL"] == "one"
        restarted = stub.RestartAgent(pb.RestartAgentRequest(agent_id="upd"), timeout=15)
        assert restarted.changed and restarted.status.pid != pid
        assert proc_environ(restarted.status.pid)["LEVEL"] == "two"

        # An empty mask: every field the request sets.
        agent = stub.UpdateAgent(
            pb.UpdateAgentRequest(agent_id="upd", spec=pb.AgentSpec(version="3.0.0", type="updated")),
            timeout=5,
        )
        assert (agent.spec.version, agent.spec.type, agent.spec.description) == (
            "3.0.0",
            "updated",
            "updated",
        )
        got = stub.GetAgent(pb.GetAgentRequest(agent_id="upd"), timeout=5)
        assert got.spec == agent.spec
    finally:
        _delete(stub, "upd")


# -- delete -------------------------------------------------------------------------------------


def test_delete_stops_the_agent_and_twice_is_fine(box: Sandbox, stub: AgentServiceStub) -> None:
    pid = create(stub, "doomed", sleeper(), start=True).status.pid
    first = stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="doomed"), timeout=15)
    assert first.deleted and first.agent_id == "doomed"
    assert not pid_alive(pid)
    assert box.agent_pids("doomed") == []
    second = stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="doomed"), timeout=15)
    assert not second.deleted
    assert "already deleted" in second.message

    err = call_error(lambda: stub.GetAgent(pb.GetAgentRequest(agent_id="doomed"), timeout=5))
    assert err.code == grpc.StatusCode.NOT_FOUND
    listed = stub.ListAgents(pb.ListAgentsRequest(), timeout=5)
    assert "doomed" not in [a.agent_id for a in listed.agents]

    # The id can be registered again afterwards.
    again = create(stub, "doomed", sleeper())
    assert again.status.state == STOPPED
    _delete(stub, "doomed")


# -- start, stop, restart -----------------------------------------------------------------------


def test_start_stop_restart_and_their_idempotence(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "cycle", sleeper())
    try:
        started = stub.StartAgent(pb.StartAgentRequest(agent_id="cycle"), timeout=10)
        assert started.changed
        pid = started.status.pid
        assert started.status.state == RUNNING and pid > 0
        assert box.agent_pids("cycle") == [pid]

        again = stub.StartAgent(pb.StartAgentRequest(agent_id="cycle"), timeout=10)
        assert not again.changed
        assert again.status.pid == pid
        assert "already running" in again.message
        assert box.agent_pids("cycle") == [pid]

        restarted = stub.RestartAgent(pb.RestartAgentRequest(agent_id="cycle"), timeout=15)
        assert restarted.changed
        new_pid = restarted.status.pid
        assert new_pid not in (0, pid)
        assert restarted.status.state == RUNNING
        assert not pid_alive(pid)
        assert box.agent_pids("cycle") == [new_pid]

        stopped = stub.StopAgent(pb.StopAgentRequest(agent_id="cycle"), timeout=15)
        assert stopped.changed
        assert stopped.status.state == STOPPED
        assert stopped.status.desired_state == pb.DESIRED_STATE_STOPPED
        assert stopped.status.pid == 0
        assert stopped.status.last_exit.signal == signal.SIGTERM
        assert not pid_alive(new_pid)

        again_stopped = stub.StopAgent(pb.StopAgentRequest(agent_id="cycle"), timeout=15)
        assert not again_stopped.changed
        assert "already stopped" in again_stopped.message

        # Restart of a stopped agent starts it.
        restarted = stub.RestartAgent(pb.RestartAgentRequest(agent_id="cycle"), timeout=15)
        assert restarted.status.state == RUNNING and restarted.status.pid > 0
        box.daemon.no_zombie_children()
    finally:
        _delete(stub, "cycle")


# -- status and metrics -------------------------------------------------------------------------


def test_status_fields(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "stat", sleeper(), start=True)
    try:
        s = wait_state(stub, "stat", RUNNING, check=lambda s: s.uptime.ToNanoseconds() >= 200_000_000)
        assert s.agent_id == "stat"
        assert s.desired_state == pb.DESIRED_STATE_RUNNING
        assert s.pid > 0 and pid_alive(s.pid)
        assert s.start_time.seconds > 0
        assert s.restart_count == 0
        assert not s.HasField("last_exit")
        assert s.node == socket.gethostname()
        assert s.runtime == pb.RUNTIME_KIND_PROCESS
        assert "started" in s.state_reason
        assert s.state_change_time.seconds > 0

        # A crash: restarted at once (the first restart costs no backoff), the exit recorded.
        first_pid = s.pid
        os.kill(first_pid, signal.SIGKILL)
        after = wait_state(stub, "stat", RUNNING, check=lambda s: s.pid not in (0, first_pid))
        assert after.restart_count == 1
        assert after.last_exit.signal == signal.SIGKILL
        assert after.last_exit.exit_code == 0
        assert "SIGKILL" in after.last_exit.reason
        assert after.last_exit.time.seconds > 0
        assert after.desired_state == pb.DESIRED_STATE_RUNNING
    finally:
        _delete(stub, "stat")


def test_metrics_of_a_running_and_a_stopped_agent(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "metered", sleeper(), start=True)
    try:
        metrics = stub.GetAgentMetrics(pb.GetAgentMetricsRequest(agent_id="metered"), timeout=5)
        assert metrics.agent_id == "metered"
        assert metrics.rss_bytes > 0
        assert metrics.num_threads >= 1
        assert metrics.open_fds >= 1
        assert metrics.cpu_percent >= 0
        assert metrics.restart_count == 0
        stub.StopAgent(pb.StopAgentRequest(agent_id="metered"), timeout=15)
        stopped = stub.GetAgentMetrics(pb.GetAgentMetricsRequest(agent_id="metered"), timeout=5)
        assert stopped.rss_bytes == 0
        assert not stopped.HasField("uptime")
    finally:
        _delete(stub, "metered")


# -- logs ---------------------------------------------------------------------------------------


def _lines(stub: AgentServiceStub, agent_id: str, tail: int) -> list[str]:
    call = stub.GetAgentLogs(pb.GetAgentLogsRequest(agent_id=agent_id, tail_lines=tail), timeout=5)
    return [line.line.rstrip("\n") for line in call]


def test_logs_tail_and_follow(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "talker", TICKER, start=True)
    try:
        everything = wait_for(
            lambda: (lines := _lines(stub, "talker", 1000)) and "tick 2" in lines and lines,
            what="the agent's first lines in its log",
        )
        assert [line for line in everything if line.startswith("line ")] == [f"line {i}" for i in range(1, 6)]
        tail = _lines(stub, "talker", 2)
        assert len(tail) == 2 and all(line.startswith("tick ") for line in tail), tail
        first, second = (int(line.split()[1]) for line in tail)
        assert second == first + 1

        call = stub.GetAgentLogs(
            pb.GetAgentLogsRequest(agent_id="talker", tail_lines=1, follow=True), timeout=20
        )
        reader = StreamReader(call)
        try:
            got = wait_for(lambda: len(reader.snapshot()) >= 4 and reader.snapshot(), what="followed lines")
            numbers = [int(item.line.split()[1]) for item in got if item.line.startswith("tick ")]
            assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
            assert numbers[-1] > int(tail[-1].split()[1]), "follow must deliver lines written later"
            assert all(item.agent_id == "talker" for item in got)
            ticks = [item for item in got if item.line.startswith("tick ")]
            assert all(item.stream == pb.LOG_STREAM_STDOUT and item.HasField("time") for item in ticks)
        finally:
            reader.cancel()
    finally:
        _delete(stub, "talker")


# -- events -------------------------------------------------------------------------------------


def test_watch_events_sees_the_lifecycle(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "watched", sleeper())
    create(stub, "unwatched", sleeper())
    reader = subscribed_events(stub, ["watched"])
    try:
        stub.StartAgent(pb.StartAgentRequest(agent_id="unwatched"), timeout=10)
        stub.StartAgent(pb.StartAgentRequest(agent_id="watched"), timeout=10)
        stub.StopAgent(pb.StopAgentRequest(agent_id="watched"), timeout=10)

        def states() -> list[int]:
            return [e.state for e in reader.snapshot() if e.agent_id == "watched"]

        expected = [pb.AGENT_STATE_STARTING, RUNNING, pb.AGENT_STATE_STOPPING, STOPPED]
        wait_for(lambda: states() == expected, what=f"events {expected}")
        events = [e for e in reader.snapshot() if e.agent_id == "watched"]
        assert [e.previous_state for e in events] == [
            STOPPED,
            pb.AGENT_STATE_STARTING,
            RUNNING,
            pb.AGENT_STATE_STOPPING,
        ]
        assert events[1].status.pid > 0 and events[1].status.state == RUNNING
        assert all(e.time.seconds > 0 and e.reason for e in events)
        assert "stopped by operator" in events[2].reason
        assert not [e for e in reader.snapshot() if e.agent_id == "unwatched"], (
            "a filtered-out agent's events"
        )
        assert not any(e.deleted for e in events)
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="watched"), timeout=10)
        wait_for(lambda: len(states()) == 5, what="the deletion's event")
        last = [e for e in reader.snapshot() if e.agent_id == "watched"][-1]
        assert last.deleted and last.state == STOPPED and "deleted by operator" in last.reason
    finally:
        reader.cancel()
        _delete(stub, "watched", "unwatched")


# -- discovery ----------------------------------------------------------------------------------


def test_discover_reports_new_agents_and_broken_manifests(box: Sandbox, stub: AgentServiceStub) -> None:
    box.package("disc-new", {"name": "disc-new", "entrypoint": sleeper(), "type": "found"})
    box.package("disc-auto", {"name": "disc-auto", "entrypoint": sleeper(), "autostart": True})
    broken = box.package("disc-broken", "name: [unclosed\nentrypoint: x\n")
    unknown = box.package("disc-unknown", {"name": "disc-unknown", "entrypoint": sleeper(), "colour": "red"})
    missing = box.package("disc-missing", {"name": "disc-missing", "entrypoint": "/no/such/program --flag"})
    box.package("_template", {"name": "template", "entrypoint": sleeper()})
    box.package("test-pkg", {"name": "test-pkg", "entrypoint": sleeper()})
    try:
        report = stub.DiscoverAgents(pb.DiscoverAgentsRequest(), timeout=10)
        found = {a.agent_id: a for a in report.agents}
        assert found["disc-new"].new and found["disc-auto"].new
        assert found["disc-new"].manifest_path == str(box.agents_dir / "disc-new" / "agent.yaml")
        assert found["disc-new"].name == "disc-new"
        assert "template" not in found and "test-pkg" not in found
        errors = {e.manifest_path: e.message for e in report.errors}
        assert "invalid YAML" in errors[str(broken / "agent.yaml")]
        assert "colour" in errors[str(unknown / "agent.yaml")]
        assert "/no/such/program" in errors[str(missing / "agent.yaml")]
        assert len(errors) == 3, errors

        agent = stub.GetAgent(pb.GetAgentRequest(agent_id="disc-new"), timeout=5)
        assert agent.source == pb.AGENT_SOURCE_DISCOVERED
        assert agent.spec.type == "found"
        assert agent.status.state == STOPPED
        wait_state(stub, "disc-auto", RUNNING)  # autostart: started at discovery

        again = stub.DiscoverAgents(pb.DiscoverAgentsRequest(), timeout=10)
        assert not any(a.new for a in again.agents)
        assert {"disc-new", "disc-auto"} <= {a.agent_id for a in again.agents}
        assert len(again.errors) == 3
    finally:
        for folder in ("disc-broken", "disc-unknown", "disc-missing", "_template", "test-pkg"):
            for child in (box.agents_dir / folder).iterdir():
                child.unlink()
            (box.agents_dir / folder).rmdir()
        _delete(stub, "disc-new", "disc-auto")


# -- commands -----------------------------------------------------------------------------------


def test_send_command_reports_why_it_cannot_deliver(box: Sandbox, stub: AgentServiceStub) -> None:
    """This opmasd runs no NATS bus yet: a command cannot be delivered, and says so. (With a bus,
    a stopped agent is a failed precondition.)"""
    create(stub, "commanded", sleeper())
    try:
        err = call_error(
            lambda: stub.SendCommand(
                pb.SendCommandRequest(
                    agent_id="commanded", command="status", timeout=duration_pb2.Duration(seconds=1)
                ),
                timeout=5,
            )
        )
        assert err.code in (
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), err
        assert "NATS" in err.message or "not running" in err.message, err.message
    finally:
        _delete(stub, "commanded")


# -- the basic lifecycle, on both stores --------------------------------------------------------


def test_basic_lifecycle(make_sandbox: Callable[..., Sandbox], backend: str) -> None:
    box = make_sandbox(backend=backend)
    box.start()
    stub = box.stub
    agent = create(stub, "life", sleeper(), description="lifecycle")
    assert agent.status.state == STOPPED
    create(stub, "gone", sleeper(), start=True)
    started = stub.StartAgent(pb.StartAgentRequest(agent_id="life"), timeout=10)
    pid = started.status.pid
    assert box.agent_pids("life") == [pid]
    s = status(stub, "life")
    assert (s.state, s.desired_state, s.pid) == (RUNNING, pb.DESIRED_STATE_RUNNING, pid)
    stub.UpdateAgent(
        pb.UpdateAgentRequest(
            agent_id="life",
            spec=pb.AgentSpec(description="changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        timeout=5,
    )
    stopped = stub.StopAgent(pb.StopAgentRequest(agent_id="life"), timeout=15)
    assert stopped.status.state == STOPPED and not pid_alive(pid)
    assert stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="gone"), timeout=15).deleted
    assert box.agent_pids("gone") == []

    # What was stored is what a new daemon reads.
    box.restart()
    stub = box.stub
    listed = stub.ListAgents(pb.ListAgentsRequest(), timeout=5)
    assert [a.agent_id for a in listed.agents] == ["life"]
    life = listed.agents[0]
    assert life.spec.description == "changed"
    assert life.status.state == STOPPED
    assert life.status.desired_state == pb.DESIRED_STATE_STOPPED
    assert life.status.last_exit.signal == signal.SIGTERM
    assert not stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="gone"), timeout=15).deleted
    transitions = box.sql("SELECT state FROM agent_transitions WHERE agent_id = ? ORDER BY id", ["life"])
    assert [t[0] for t in transitions] == ["starting", "running", "stopping", "stopped"]
    assert box.processes() == []
