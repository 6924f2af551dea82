"""A real opmasd on a PostgreSQL of the test's own, which the tests stop, freeze and bring back.

The store's promises, seen from outside: an operator's change is acknowledged only once it is
committed (else UNAVAILABLE, and nothing changed); while PostgreSQL is down or frozen, reads
served from memory answer at once and supervision goes on; a node starts and runs its agents
with PostgreSQL unreachable, from its own copy; after kill -9 of opmasd during an outage, nothing
acknowledged is lost, no agent runs twice and nothing runs unmanaged.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import grpc
import psycopg2  # type: ignore[import-untyped]
from pgcluster import PrivateCluster

from opmas.v1 import agents_pb2 as pb

from .harness import Sandbox, call_error, create, kill_pid, sleeper, status, wait_for, wait_state

# Short bounds keep the outage tests quick: connecting, each statement, and an operator's wait.
COMMIT_TIMEOUT = 2.0
# The store's own bound on one call: the statement timeout (2 s) and the 2 s before a cut. A
# commit already handed to the database waits for that call's outcome past COMMIT_TIMEOUT.
CALL_DEADLINE = 4.0


def store_env(cluster: PrivateCluster) -> dict[str, str]:
    url = f"{cluster.url}?connect_timeout=2&options=-c%20statement_timeout%3D2000"
    return {"OPMAS_DATABASE_URL": url, "OPMAS_DATABASE_COMMIT_TIMEOUT": f"{COMMIT_TIMEOUT}s"}


def started_on(cluster: PrivateCluster, make_sandbox: Callable[..., Sandbox]) -> Sandbox:
    """A sandbox whose opmasd uses the cluster, started."""
    box = make_sandbox(env=store_env(cluster))
    box.start()
    return box


def rows(cluster: PrivateCluster) -> dict[str, dict[str, Any]]:
    """The agents as PostgreSQL holds them."""
    with psycopg2.connect(cluster.url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT agent_id, desired, state, pid, deleted FROM agents")
        return {
            agent_id: {"desired": desired, "state": state, "pid": pid, "deleted": deleted}
            for agent_id, desired, state, pid, deleted in cur.fetchall()
        }


def transitions(cluster: PrivateCluster, agent_id: str) -> list[str]:
    with psycopg2.connect(cluster.url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT reason FROM agent_transitions WHERE agent_id = %s ORDER BY id", (agent_id,))
        return [reason for (reason,) in cur.fetchall()]


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def refused_unavailable(call: Callable[[], Any]) -> str:
    """The call must fail with UNAVAILABLE in bounded time (see CALL_DEADLINE); its message."""
    took, error = timed(lambda: call_error(call))
    assert error.code is grpc.StatusCode.UNAVAILABLE, (error.code, error.message)
    assert took < COMMIT_TIMEOUT + CALL_DEADLINE + 1, took
    return str(error.message)


def reads_answer_at_once(box: Sandbox, agent_id: str) -> None:
    """Reads are served from memory: they do not wait for the database."""
    for _ in range(20):
        took, _ = timed(lambda: status(box.stub, agent_id))
        assert took < 0.5, f"GetAgentStatus took {took:.2f}s while the database is away"
    took, _ = timed(lambda: box.stub.ListAgents(pb.ListAgentsRequest(), timeout=5))
    assert took < 0.5


def one_process_each(box: Sandbox, agent_ids: list[str]) -> dict[str, int]:
    """Each agent runs exactly its recorded process; nothing else of the sandbox runs."""
    pids = {}
    for agent_id in agent_ids:
        s = status(box.stub, agent_id)
        assert s.state == pb.AGENT_STATE_RUNNING, (agent_id, pb.AgentState.Name(s.state))
        assert box.agent_pids(agent_id) == [s.pid], (agent_id, box.agent_pids(agent_id), s.pid)
        pids[agent_id] = s.pid
    assert sorted(box.processes()) == sorted(pids.values()), "a process runs that no agent owns"
    return pids


def test_postgres_stopped_refuses_changes_and_keeps_supervising(
    private_pg: PrivateCluster, make_sandbox: Callable[..., Sandbox]
) -> None:
    box = started_on(private_pg, make_sandbox)
    stub = box.stub
    create(stub, "runner", sleeper(), start=True)
    create(stub, "idle", sleeper())
    first = status(stub, "runner").pid

    private_pg.stop()
    message = refused_unavailable(lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="runner"), timeout=10))
    assert "database is unavailable" in message and "runner" in message
    refused_unavailable(lambda: stub.StartAgent(pb.StartAgentRequest(agent_id="idle"), timeout=10))
    refused_unavailable(lambda: create(stub, "newcomer", sleeper()))
    refused_unavailable(
        lambda: stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="idle"), timeout=10),
    )
    # Nothing the operator was refused happened, in memory either.
    runner = status(stub, "runner")
    assert runner.state == pb.AGENT_STATE_RUNNING and runner.pid == first
    assert status(stub, "idle").state == pb.AGENT_STATE_STOPPED
    assert call_error(lambda: stub.GetAgent(pb.GetAgentRequest(agent_id="newcomer"))).code is (
        grpc.StatusCode.NOT_FOUND
    )
    reads_answer_at_once(box, "runner")
    # Supervision goes on: a killed agent is restarted while the database is away.
    kill_pid(first)
    restarted = wait_state(stub, "runner", pb.AGENT_STATE_RUNNING, check=lambda s: s.pid not in (0, first))

    private_pg.start()
    # What was observed meanwhile reaches PostgreSQL once it is back.
    wait_for(lambda: rows(private_pg)["runner"]["pid"] == restarted.pid, timeout=40, what="the restart's PID")
    assert any("killed by SIGKILL" in reason for reason in transitions(private_pg, "runner"))
    stored = rows(private_pg)
    assert "newcomer" not in stored and stored["idle"]["desired"] == "stopped"
    assert not stored["idle"]["deleted"]
    # And operators' changes are taken again.
    stub.StopAgent(pb.StopAgentRequest(agent_id="runner"), timeout=15)
    assert rows(private_pg)["runner"]["desired"] == "stopped"


def test_postgres_frozen_answers_reads_and_refuses_changes_in_bounded_time(
    private_pg: PrivateCluster, make_sandbox: Callable[..., Sandbox]
) -> None:
    box = started_on(private_pg, make_sandbox)
    stub = box.stub
    create(stub, "runner", sleeper(), start=True)
    pid = status(stub, "runner").pid

    private_pg.freeze()
    try:
        refused_unavailable(lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="runner"), timeout=10))
        assert status(stub, "runner").state == pb.AGENT_STATE_RUNNING
        reads_answer_at_once(box, "runner")
        # Calls in flight all come back, none hangs: the commit's bound, not the database's.
        for agent_id in ("a", "b", "c"):
            refused_unavailable(lambda agent_id=agent_id: create(stub, agent_id, sleeper()))  # type: ignore[misc]
        kill_pid(pid)
        wait_state(stub, "runner", pb.AGENT_STATE_RUNNING, check=lambda s: s.pid not in (0, pid))
    finally:
        private_pg.thaw()
    # Thawed: the calls cut past their deadline are behind it; changes are committed again.
    wait_for(
        lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="runner"), timeout=15),
        timeout=30,
        what="a stop committed after the thaw",
    )
    assert rows(private_pg)["runner"]["desired"] == "stopped"
    assert set(rows(private_pg)) == {"runner"}  # nothing refused was written


def test_kill_9_during_an_outage_loses_nothing_acknowledged_and_runs_nothing_twice(
    private_pg: PrivateCluster, make_sandbox: Callable[..., Sandbox]
) -> None:
    box = started_on(private_pg, make_sandbox)
    stub = box.stub
    agents = [f"a{i}" for i in range(5)]
    for agent_id in agents:
        create(stub, agent_id, sleeper(), start=True)
    create(stub, "parked", sleeper())
    # What was acknowledged before the outage.
    stub.StopAgent(pb.StopAgentRequest(agent_id="a4"), timeout=15)
    acknowledged = {**dict.fromkeys(agents[:4], "running"), "a4": "stopped", "parked": "stopped"}
    running = agents[:4]
    before = one_process_each(box, running)

    private_pg.stop()
    refused_unavailable(lambda: stub.StartAgent(pb.StartAgentRequest(agent_id="parked"), timeout=10))
    kill_pid(before["a0"])  # observed during the outage: only the node's copy has it
    renewed = wait_state(stub, "a0", pb.AGENT_STATE_RUNNING, check=lambda s: s.pid not in (0, before["a0"]))
    box.daemon.kill()  # kill -9 in the middle of the outage

    # PostgreSQL still down: the node starts from its own copy and re-adopts, never relaunches.
    box.start()
    stub = box.stub
    after = one_process_each(box, running)
    assert after == {**before, "a0": renewed.pid}
    for agent_id, desired in acknowledged.items():
        got = status(stub, agent_id)
        assert pb.DesiredState.Name(got.desired_state).lower().endswith(desired), agent_id
    refused_unavailable(lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="a1"), timeout=10))

    private_pg.start()
    wait_for(lambda: rows(private_pg)["a0"]["pid"] == renewed.pid, timeout=40, what="the node copy sent")
    stored = rows(private_pg)
    lost = [a for a, desired in acknowledged.items() if stored[a]["desired"] != desired]
    assert lost == [], f"acknowledged changes lost: {lost}"
    # Back to normal: a change is committed, and one more kill -9 then start finds it all.
    stub.StopAgent(pb.StopAgentRequest(agent_id="a1"), timeout=15)
    box.daemon.kill()
    box.start()
    one_process_each(box, ["a0", "a2", "a3"])
    assert status(box.stub, "a1").state == pb.AGENT_STATE_STOPPED
    assert rows(private_pg)["a1"]["desired"] == "stopped"


def test_opmasd_starts_with_postgres_unreachable_from_scratch(
    private_pg: PrivateCluster, make_sandbox: Callable[..., Sandbox]
) -> None:
    """A node whose PostgreSQL has never answered still starts: empty, and refusing changes."""
    private_pg.stop()
    box = started_on(private_pg, make_sandbox)
    assert list(box.stub.ListAgents(pb.ListAgentsRequest(), timeout=5).agents) == []
    refused_unavailable(lambda: create(box.stub, "early", sleeper()))
    private_pg.start()
    wait_for(
        lambda: create(box.stub, "late", sleeper()),
        timeout=40,
        interval=0.5,
        what="a registration once PostgreSQL is reachable",
    )
    assert "late" in rows(private_pg) and "early" not in rows(private_pg)


def test_sqlite_locked_by_another_process_refuses_changes_and_keeps_serving(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    """The default store, held by someone else: honest UNAVAILABLE, nothing changed, reads and
    supervision go on, and changes are taken again once it is free."""
    box = make_sandbox(env={"OPMAS_DATABASE_COMMIT_TIMEOUT": "1s"})
    box.start()
    stub = box.stub
    create(stub, "runner", sleeper(), start=True)
    first = status(stub, "runner").pid
    locker = sqlite3.connect(box.state_dir / "opmas.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        took, error = timed(
            lambda: call_error(lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="runner")))
        )
        assert error.code is grpc.StatusCode.UNAVAILABLE and "locked" in error.message, error
        assert took < 8, took  # the commit timeout, or SQLite's own 5 s busy timeout
        runner = status(stub, "runner")
        assert (runner.state, runner.pid) == (pb.AGENT_STATE_RUNNING, first)
        reads_answer_at_once(box, "runner")
        kill_pid(first)
        wait_state(stub, "runner", pb.AGENT_STATE_RUNNING, check=lambda s: s.pid not in (0, first))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    stub.StopAgent(pb.StopAgentRequest(agent_id="runner"), timeout=15)
    box.restart("kill")
    assert status(box.stub, "runner").state == pb.AGENT_STATE_STOPPED  # committed, kept
