"""FleetStore on a private PostgreSQL and a real SQLite copy: which side wins what, and bounded
calls on a frozen server. The daemon-level outage tests are in tests/e2e/test_store_faults.py."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pgcluster import PrivateCluster

from opmasd.core.errors import StoreDegraded, StoreError
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, DesiredState, Transition
from opmasd.store import fleet
from opmasd.store.fleet import FleetStore
from opmasd.store.sql import SqlStore

NODE = "n1"


def quick(cluster: PrivateCluster) -> str:
    """The cluster's URL with short bounds: 1 s statements, so calls are cut after 3 s."""
    return f"{cluster.url}?connect_timeout=2&options=-c%20statement_timeout%3D1000"


def record(agent_id: str, node: str = NODE, **fields: object) -> AgentRecord:
    rec = AgentRecord(agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("sleep", "1")), node=node)
    return dataclasses.replace(rec, **fields)


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL is tried again at once after a failure: the tests bring it back themselves.
    monkeypatch.setattr(fleet, "RETRY_INITIAL", 0.0)
    monkeypatch.setattr(fleet, "RETRY_MAX", 0.0)


def test_operators_changes_need_postgres_and_observations_wait_in_the_copy(
    private_pg: PrivateCluster, tmp_path: Path
) -> None:
    store = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    store.commit_rows([record("a", desired=DesiredState.RUNNING)])
    private_pg.stop()
    with pytest.raises(StoreError):
        store.commit_rows([record("b")])
    running = record("a", desired=DesiredState.RUNNING, state=AgentState.RUNNING, pid=4242)
    step = Transition("a", AgentState.STARTING, AgentState.RUNNING, "started")
    with pytest.raises(StoreDegraded):
        store.write_batch([running], [step])
    with pytest.raises(StoreDegraded):
        store.sync()
    store.close()
    # A restart with PostgreSQL still down runs from the copy: the refused agent is not there.
    again = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    assert [(r.agent_id, r.pid) for r in again.load_agents()] == [("a", 4242)]
    private_pg.start()
    again.sync()
    shared = SqlStore.open(private_pg.url)
    try:
        assert [(r.agent_id, r.pid, r.desired) for r in shared.load_agents()] == [
            ("a", 4242, DesiredState.RUNNING)
        ]
        assert [t.reason for t in shared.transitions("a")] == ["started"]
    finally:
        shared.close()
        again.close()


def test_at_start_postgres_wins_what_operators_decide_and_the_copy_what_the_node_saw(
    private_pg: PrivateCluster, tmp_path: Path
) -> None:
    store = FleetStore.open(private_pg.url, NODE, tmp_path / "copy.db")
    store.commit_rows([record("a", desired=DesiredState.RUNNING), record("theirs", node="n2")])
    private_pg.stop()
    with pytest.raises(StoreDegraded):
        store.write_batch([record("a", desired=DesiredState.RUNNING, state=AgentState.RUNNING, pid=77)], [])
    store.close()
    private_pg.start()
    # Meanwhile another node's API stopped the agent: a decision, committed in PostgreSQL.
    other = SqlStore.open(private_pg.url)
    other.commit_rows([record("a", desired=DesiredState.STOPPED)])
    other.close()

    merged = {
        r.agent_id: r for r in FleetStore.open(private_pg.url, NODE, tmp_path / "copy.db").load_agents()
    }
    assert merged["a"].desired is DesiredState.STOPPED  # PostgreSQL's decision
    assert (merged["a"].state, merged["a"].pid) == (AgentState.RUNNING, 77)  # the node's observation
    assert merged["theirs"].node == "n2"  # other nodes' agents come from PostgreSQL alone
    shared = SqlStore.open(private_pg.url)
    try:
        assert {r.agent_id: r.pid for r in shared.load_agents()}["a"] == 77  # and PostgreSQL learns it
    finally:
        shared.close()


def test_a_call_on_a_frozen_postgres_is_cut_at_its_deadline(private_pg: PrivateCluster) -> None:
    store = SqlStore.open(quick(private_pg))
    store.write_batch([record("a")], [])
    private_pg.freeze()
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            store.write_batch([record("a", pid=1)], [])
            outcome.append(None)
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    # On a thread: should the cut not happen, the test fails (and thaws) instead of hanging.
    writer = threading.Thread(target=write, daemon=True)
    try:
        started = time.monotonic()
        writer.start()
        writer.join(15)
        took = time.monotonic() - started
        assert not writer.is_alive(), "the call on a frozen server was never cut"
        assert isinstance(outcome[0], StoreError), outcome
        assert 2.5 < took < 6, took  # statement_timeout 1 s + the 2 s margin, not forever
    finally:
        private_pg.thaw()
        writer.join(15)
    store.write_batch([record("a", pid=2)], [])  # a fresh connection once it answers again
    assert store.load_agents()[0].pid == 2
    store.close()


def test_an_operators_change_is_in_both_or_in_neither(private_pg: PrivateCluster, tmp_path: Path) -> None:
    store = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    store.commit_rows([record("a", desired=DesiredState.RUNNING)])
    # PostgreSQL refuses: the copy is put back (the changed row as it was, the new one gone).
    private_pg.stop()
    with pytest.raises(StoreError):
        store.commit_rows([record("a", desired=DesiredState.STOPPED), record("b")])
    copy = SqlStore.open(f"sqlite:///{tmp_path / 'copy.db'}")
    assert [(r.agent_id, r.desired) for r in copy.load_agents()] == [("a", DesiredState.RUNNING)]
    private_pg.start()
    # The copy refuses (another process holds its write lock): PostgreSQL never sees the change,
    # so a node that starts from its copy never runs on less than it acknowledged.
    locker = sqlite3.connect(tmp_path / "copy.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            store.commit_rows([record("a", desired=DesiredState.STOPPED)])
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    shared = SqlStore.open(private_pg.url)
    try:
        assert [(r.agent_id, r.desired) for r in shared.load_agents()] == [("a", DesiredState.RUNNING)]
    finally:
        shared.close()
        copy.close()
        store.close()
