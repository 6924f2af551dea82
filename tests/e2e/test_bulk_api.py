"""Labels, selectors and bulk start/stop/restart against a real opmasd, over gRPC and REST, and
the log tail's `since` and `tail_lines: 0`: what a script sees."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import code_pb2

from opmas.v1 import agents_pb2 as pb

from .harness import Sandbox, call_error, pid_alive, python_agent, sleeper, wait_for
from .rest_client import Rest, rest_of, rest_sandbox

pytestmark = pytest.mark.timeout(90)

# Ignores SIGTERM: a stop waits out its whole stop_timeout, then SIGKILL.
STUBBORN = python_agent(
    """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with rest_sandbox("bulk") as b:
        yield b


@pytest.fixture
def rest(box: Sandbox) -> Iterator[Rest]:
    client = rest_of(box)
    yield client
    client.close()


def register(box: Sandbox, agent_id: str, labels: dict[str, str], command: list[str] | None = None) -> None:
    spec = pb.AgentSpec(name=agent_id, command=command or sleeper(), labels=labels)
    spec.start_seconds.FromSeconds(0)
    box.stub.CreateAgent(pb.CreateAgentRequest(agent_id=agent_id, spec=spec, start=True), timeout=20)


def ids(response: pb.ListAgentsResponse) -> list[str]:
    return [agent.agent_id for agent in response.agents]


def test_labels_select_over_grpc_and_rest(box: Sandbox, rest: Rest) -> None:
    register(box, "lab-web-1", {"env": "prod", "role": "web"})
    register(box, "lab-web-2", {"env": "prod", "role": "web"})
    register(box, "lab-probe", {"env": "dev", "role": "probe"})
    listed = box.stub.ListAgents(pb.ListAgentsRequest(label_selector="env=prod,role!=probe"), timeout=10)
    assert ids(listed) == ["lab-web-1", "lab-web-2"] and listed.total_size == 2
    assert dict(listed.agents[0].spec.labels) == {"env": "prod", "role": "web"}
    reply = rest.get("/api/v1/agents?label_selector=role%20in%20(probe)")
    assert reply.status == 200, reply.body
    assert [a["agentId"] for a in reply.json()["agents"]] == ["lab-probe"]
    assert reply.json()["agents"][0]["spec"]["labels"] == {"env": "dev", "role": "probe"}

    bad = call_error(
        lambda: box.stub.ListAgents(pb.ListAgentsRequest(label_selector="env in (a"), timeout=10)
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "label_selector" in bad.message
    reply = rest.get("/api/v1/agents?label_selector=env%3D%3D%3Dx")
    assert reply.status == 400 and b"label_selector" in reply.body

    bad = call_error(lambda: register(box, "lab-bad", {"bad key": "x"}))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "spec.labels" in bad.message

    # Relabelled through UpdateAgent (the mask names labels; the map is replaced).
    spec = pb.AgentSpec(labels={"env": "staging"})
    request = pb.UpdateAgentRequest(agent_id="lab-probe", spec=spec)
    request.update_mask.paths.append("labels")
    assert dict(box.stub.UpdateAgent(request, timeout=10).spec.labels) == {"env": "staging"}


def test_bulk_stop_start_restart_report_per_agent(box: Sandbox, rest: Rest) -> None:
    register(box, "blk-a", {"group": "blk"})
    register(box, "blk-b", {"group": "blk"})
    pids = {
        a: box.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=a), timeout=10).pid
        for a in ("blk-a", "blk-b")
    }

    stopped = box.stub.StopAgents(pb.StopAgentsRequest(label_selector="group=blk"), timeout=30)
    assert [(r.agent_id, r.code, r.changed) for r in stopped.results] == [
        ("blk-a", code_pb2.OK, True),
        ("blk-b", code_pb2.OK, True),
    ]
    # The call returns when the processes are gone.
    assert not any(pid_alive(pid) for pid in pids.values())
    assert all(r.status.state == pb.AGENT_STATE_STOPPED for r in stopped.results)

    # Over REST, by ids, one of which does not exist: a result with NOT_FOUND, not a failed call.
    reply = rest.post("/api/v1/agents:start", {"agentIds": ["blk-b", "blk-ghost", "blk-a"]})
    assert reply.status == 200, reply.body
    results = reply.json()["results"]
    assert [(r["agentId"], r["code"], r["changed"]) for r in results] == [
        ("blk-a", "OK", True),
        ("blk-b", "OK", True),
        ("blk-ghost", "NOT_FOUND", False),
    ]
    assert "blk-ghost" in results[2]["message"]
    assert results[0]["status"]["state"] == "AGENT_STATE_RUNNING"

    restarted = box.stub.RestartAgents(pb.RestartAgentsRequest(label_selector="group=blk"), timeout=30)
    assert [r.changed for r in restarted.results] == [True, True]
    assert all(r.status.pid and r.status.pid not in pids.values() for r in restarted.results)

    nothing = box.stub.StopAgents(pb.StopAgentsRequest(label_selector="group=none"), timeout=30)
    assert list(nothing.results) == []


def test_a_bulk_request_must_select_in_exactly_one_way(box: Sandbox, rest: Rest) -> None:
    for request in (
        pb.StopAgentsRequest(),
        pb.StopAgentsRequest(agent_ids=["x"], all=True),
        pb.StopAgentsRequest(label_selector="a=b", all=True),
        pb.StopAgentsRequest(agent_ids=["Not An Id"]),
        pb.StopAgentsRequest(label_selector="a in ("),
    ):
        error = call_error(lambda r=request: box.stub.StopAgents(r, timeout=10))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, request
    reply = rest.post("/api/v1/agents:restart", {})
    assert reply.status == 400 and b"selects no agent" in reply.body


def test_a_bulk_stop_of_slow_agents_takes_one_agents_time(box: Sandbox) -> None:
    """Three agents that ignore SIGTERM, each with a 2 s stop timeout: stopped one after the
    other they would take over 6 s; concurrently, about 2 s."""
    for n in range(3):
        spec = pb.AgentSpec(name=f"slow-{n}", command=STUBBORN, labels={"group": "slow"})
        spec.start_seconds.FromSeconds(0)
        spec.stop_timeout.FromSeconds(2)
        box.stub.CreateAgent(pb.CreateAgentRequest(agent_id=f"slow-{n}", spec=spec, start=True), timeout=20)

    def ready(agent_id: str) -> bool:
        request = pb.GetAgentLogsRequest(agent_id=agent_id)
        return any(line.line == "ready" for line in box.stub.GetAgentLogs(request, timeout=10))

    for n in range(3):
        wait_for(lambda n=n: ready(f"slow-{n}"), timeout=15)  # SIGTERM is ignored from here on
    began = time.monotonic()
    stopped = box.stub.StopAgents(pb.StopAgentsRequest(label_selector="group=slow"), timeout=30)
    took = time.monotonic() - began
    assert [r.code for r in stopped.results] == [code_pb2.OK] * 3
    assert all(r.status.state == pb.AGENT_STATE_STOPPED for r in stopped.results)
    assert 1.9 <= took < 5, took


def test_log_tail_zero_is_none_and_since_cuts_older_lines(box: Sandbox, rest: Rest) -> None:
    ticker = python_agent(
        """
        import itertools, time
        for n in itertools.count():
            print(f"tick {n}", flush=True)
            time.sleep(0.05)
        """
    )
    register(box, "ticker", {}, ticker)

    def tail(**kw: object) -> list[str]:
        request = pb.GetAgentLogsRequest(agent_id="ticker", **kw)  # type: ignore[arg-type]
        return [line.line for line in box.stub.GetAgentLogs(request, timeout=10)]

    wait_for(lambda: len([t for t in tail() if t.startswith("tick")]) >= 10, timeout=15)
    assert tail(tail_lines=0) == []
    assert len(tail(tail_lines=3)) == 3
    cut = pb.GetAgentLogsRequest(agent_id="ticker")
    cut.since.GetCurrentTime()
    time.sleep(0.5)
    recent = [
        line
        for line in box.stub.GetAgentLogs(
            pb.GetAgentLogsRequest(agent_id="ticker", since=cut.since), timeout=10
        )
    ]
    assert recent and all(line.time.ToNanoseconds() >= cut.since.ToNanoseconds() for line in recent)
    assert len(recent) < 20  # half a second of ticks, not the whole log
    everything = tail()
    assert len(everything) > len(recent)
    reply = rest.get("/api/v1/agents/ticker/logs?tail_lines=0")
    assert reply.status == 200 and reply.body.strip() == b""
    bad = call_error(lambda: tail(tail_lines=-1))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
