"""Faults from outside, against a real opmasd: trees that never leak, crash-safe launches, an
honest start. Each drives the daemon over gRPC and checks with /proc what really runs."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from opmas.v1 import agents_pb2 as pb

from .harness import Sandbox, create, pid_alive, proc_environ, sleeper, wait_for, wait_state

pytestmark = pytest.mark.timeout(120)

RUNNING = pb.AGENT_STATE_RUNNING
STOPPED = pb.AGENT_STATE_STOPPED
AT_ONCE = duration_pb2.Duration()

# A classic double fork: the grandchild is reparented away and lives in a session of its own.
DOUBLE_FORK = "(setsid sh -c 'exec sleep 3602' &); echo forked; {rest}"


def cgroups_in_use(box: Sandbox) -> bool:
    return "agent process trees tracked by cgroup" in box.daemon.stderr_text()


def grandchildren(box: Sandbox, agent_id: str) -> list[int]:
    return [pid for pid in box.agent_pids(agent_id) if _cmdline(pid) == b"sleep\x003602\x00"]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def test_a_double_fork_outlives_neither_a_stop_nor_an_exit(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    if not cgroups_in_use(box):
        pytest.skip("opmasd found no cgroup to use on this host (the fallback cannot see a double fork)")
    stub = box.stub
    create(stub, "stays", ["sh", "-c", DOUBLE_FORK.format(rest="exec sleep 1000")], start=True)
    escaped = wait_for(lambda: grandchildren(box, "stays"), what="the double-forked grandchild")
    stub.StopAgent(pb.StopAgentRequest(agent_id="stays"), timeout=15)
    assert not any(pid_alive(pid) for pid in escaped), "a stop left the double-forked process running"
    assert box.agent_pids("stays") == []

    # One that exits by itself (after its start window): its leftover is killed and named.
    script = DOUBLE_FORK.format(rest="sleep 1.5; exit 0")
    create(stub, "leaves", ["sh", "-c", script], start=True, restart_policy=pb.RESTART_POLICY_NEVER)
    left = wait_for(lambda: grandchildren(box, "leaves"), what="the double-forked grandchild")
    s = wait_state(stub, "leaves", STOPPED, timeout=10)
    assert not any(pid_alive(pid) for pid in left)
    assert f"killed 1 leftover process(es): {left[0]} sleep 3602" in s.state_reason, s.state_reason
    assert box.agent_pids("leaves") == []


def test_start_answers_with_the_outcome_of_the_start_window(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    stub = box.stub
    with pytest.raises(grpc.RpcError) as failed:
        create(stub, "brief", ["sh", "-c", "sleep 0.3; exit 0"], start=True)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The time is measured from the launch: a hair under the 0.3 s slept is fine.
    assert re.search(r"failed to start: exited with code 0 after 0\.(29|3)\d*s", failed.value.details() or "")
    reasons = [r[0] for r in box.sql("SELECT reason FROM agent_transitions WHERE agent_id = 'brief'")]
    assert any(r.startswith("failed to start: exited with code 0") for r in reasons), reasons

    began = time.monotonic()
    started = create(stub, "steady", sleeper(), start=True)
    assert started.status.state == RUNNING and time.monotonic() - began >= 0.9
    assert create(stub, "quick", sleeper(), start=True, start_seconds=AT_ONCE).status.state == RUNNING


def test_kill_9_during_bursts_of_creates_and_restarts_leaves_no_process_unmanaged_or_twice(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    box = make_sandbox()
    box.start()
    if not cgroups_in_use(box):
        pytest.skip("opmasd found no cgroup to use on this host")
    rng = random.Random(8)
    for trial in range(4):
        ids = [f"t{trial}-{n}" for n in range(20)]
        calls = [
            box.stub.CreateAgent.future(
                pb.CreateAgentRequest(
                    agent_id=agent_id, spec=pb.AgentSpec(name=agent_id, command=sleeper()), start=True
                ),
                timeout=10,
            )
            for agent_id in ids
        ]
        # And restarts of the agents of the trial before, each a stop and a new launch.
        calls += [
            box.stub.RestartAgent.future(pb.RestartAgentRequest(agent_id=f"t{trial - 1}-{n}"), timeout=10)
            for n in range(0, 20, 2)
            if trial
        ]
        time.sleep(rng.uniform(0.0, 0.25))  # somewhere in the middle of the burst
        box.daemon.kill()
        for call in calls:
            call.exception()  # answered or cut off: either way done
        box.start()
        stub = box.stub

        def settled(stub: object = stub) -> bool:
            return all(s.state != pb.AGENT_STATE_STARTING for s in _statuses(stub))

        wait_for(settled, what="starts settled")
        # Every live agent process is the one its agent records, and no agent has two.
        known = {s.agent_id: s.pid for s in _statuses(stub)}
        for pid in box.processes():
            agent_id = proc_environ(pid).get("AGENT_ID", "")
            if not pid_alive(pid):
                continue
            assert known.get(agent_id) == pid, f"trial {trial}: pid {pid} of {agent_id!r} is not managed"
        for agent_id, pid in known.items():
            assert len(box.agent_pids(agent_id)) <= 1, f"trial {trial}: {agent_id} runs twice"
            if pid:
                assert box.agent_pids(agent_id) == [pid]
    assert box.daemon.stop() == 0
    assert box.processes() == []


def _statuses(stub: object) -> list[pb.AgentStatus]:
    response = stub.ListAgents(pb.ListAgentsRequest(), timeout=10)  # type: ignore[attr-defined]
    return [agent.status for agent in response.agents]
