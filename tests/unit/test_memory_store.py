"""MemoryStore's own promises; the behaviour it shares with SqlStore is held to the same
contract as the real stores in tests/integration/test_store.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from opmasd.core.errors import StoreError
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, ExitInfo, Transition
from opmasd.store.base import AgentStore
from opmasd.testing.memory_store import MemoryStore


def record(agent_id: str = "a") -> AgentRecord:
    return AgentRecord(agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("true",)))


def step(agent_id: str = "a", reason: str = "started") -> Transition:
    return Transition(
        agent_id, AgentState.STOPPED, AgentState.RUNNING, reason, datetime(2025, 1, 1, tzinfo=UTC)
    )


def test_it_is_an_agent_store() -> None:
    store: AgentStore = MemoryStore()
    assert store.load_agents() == []


def test_saved_records_are_copies() -> None:
    store = MemoryStore()
    original = record()
    store.save_agent(original)
    original.state = AgentState.ERROR
    original.last_exit = ExitInfo(1, None)
    assert store.load_agents() == [dataclasses.replace(original, state=AgentState.STOPPED, last_exit=None)]


def test_loaded_records_are_copies() -> None:
    store = MemoryStore()
    store.save_agent(record())
    store.load_agents()[0].state = AgentState.RUNNING
    assert store.load_agents()[0].state is AgentState.STOPPED


def test_record_transition_stores_a_copy_of_the_row() -> None:
    store = MemoryStore()
    row = record()
    store.record_transition(row, step())
    row.pid = 99
    assert store.load_agents()[0].pid is None
    assert store.transitions("a") == [step()]


def test_transitions_newest_first_and_prune() -> None:
    store = MemoryStore()
    for n in range(4):
        store.record_transition(record(), step(reason=f"r{n}"))
    assert [t.reason for t in store.transitions("a", limit=3)] == ["r3", "r2", "r1"]
    assert store.prune_transitions(1) == 3
    assert [t.reason for t in store.transitions("a")] == ["r3"]


def test_a_set_failure_is_raised_by_every_call_until_cleared() -> None:
    store = MemoryStore()
    store.failure = StoreError("database went away")
    with pytest.raises(StoreError, match="went away"):
        store.save_agent(record())
    with pytest.raises(StoreError, match="went away"):
        store.record_transition(record(), step())
    with pytest.raises(StoreError, match="went away"):
        store.load_agents()
    store.failure = None
    assert store.load_agents() == []
    assert store.transitions("a") == []


def test_closed_store_refuses_calls() -> None:
    store = MemoryStore()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.transitions("a")
