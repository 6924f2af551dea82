"""The write-behind's promises, each pinned: acknowledged means committed, a failed commit is
not retried behind its caller's back, the queue is bounded and coalesced per agent, the event
loop never waits for the database, and a cancelled attempt neither loses nor repeats a write."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from opmasd.core.errors import StoreDegraded, StoreError
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, DesiredState, Transition
from opmasd.manager.persistence import MAX_PENDING_TRANSITIONS, WriteBehind
from opmasd.testing.clock import FakeClock
from opmasd.testing.memory_store import MemoryStore


def record(agent_id: str, desired: DesiredState = DesiredState.STOPPED) -> AgentRecord:
    rec = AgentRecord(agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("sleep", "1")))
    rec.desired = desired
    return rec


def step(agent_id: str, reason: str = "x") -> Transition:
    return Transition(agent_id, AgentState.STOPPED, AgentState.STARTING, reason)


class FrozenStore(MemoryStore):
    """A store whose writes block until thawed: a database that stopped answering."""

    def __init__(self) -> None:
        super().__init__()
        self.thawed = threading.Event()
        self.thawed.set()
        self.writes = 0

    def write_batch(self, records: Sequence[AgentRecord], transitions: Sequence[Transition]) -> None:
        self.thawed.wait(10)
        self.writes += 1
        super().write_batch(records, transitions)


async def test_a_commit_answers_only_once_committed() -> None:
    store = MemoryStore()
    writes = WriteBehind(store)
    writes.write(record("a", DesiredState.RUNNING), None)
    await writes.commit("a")
    assert store.load_agents()[0].desired is DesiredState.RUNNING
    await writes.close(1.0)


async def test_a_failed_commit_is_not_retried_but_observations_are() -> None:
    store = MemoryStore()
    writes = WriteBehind(store, FakeClock())
    writes.write(record("a"), None)
    await writes.commit("a")
    store.failure = StoreError("database is down")
    writes.write(record("b"), step("b"))  # observed: must reach the store later
    writes.write(record("a", DesiredState.RUNNING), None)  # an operator's change
    with pytest.raises(StoreError, match="database is down"):
        await writes.commit("a")
    assert writes.failing
    store.failure = None
    await writes.flushed()
    stored = {r.agent_id: r for r in store.load_agents()}
    # The refused change never lands, even though the database came back; the observation does.
    assert stored["a"].desired is DesiredState.STOPPED
    assert "b" in stored and [t.agent_id for t in store.transitions("b")] == ["b"]
    assert not writes.failing
    await writes.close(1.0)


async def test_a_frozen_database_never_blocks_the_loop_and_commits_answer_in_bounded_time() -> None:
    store = FrozenStore()
    writes = WriteBehind(store, commit_timeout=0.3)
    store.thawed.clear()
    writes.write(record("a", DesiredState.RUNNING), None)
    # Handed to the database: its outcome decides, since an undo could not take back a write
    # that lands later (the store bounds its own calls).
    first = asyncio.create_task(writes.commit("a"))
    await asyncio.sleep(0.05)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    running = asyncio.create_task(ticker())
    writes.write(record("b", DesiredState.RUNNING), None)
    # Queued behind the stuck write: refused at commit_timeout, never written as a commit.
    with pytest.raises(
        StoreError, match=r"did not confirm the write within 0\.3s \(stuck in: write agents\)"
    ):
        await writes.commit("b")
    assert ticks >= 10  # the loop went on while the store's thread was stuck
    assert not first.done()
    running.cancel()
    store.thawed.set()
    await first
    assert {r.agent_id for r in store.load_agents()} >= {"a"}
    await writes.close(1.0)


async def test_the_queue_is_coalesced_per_agent_and_bounded_while_the_store_fails() -> None:
    store = MemoryStore()
    writes = WriteBehind(store, FakeClock())
    store.failure = StoreError("database is down")
    for i in range(MAX_PENDING_TRANSITIONS + 500):
        writes.write(record("a"), step("a", f"r{i}"))
        writes.write(record("b"), None)
    # One row per agent, and at most MAX_PENDING_TRANSITIONS transitions each.
    assert writes.pending == 2 + MAX_PENDING_TRANSITIONS
    with pytest.raises(StoreError):
        await writes.flushed()
    assert writes.pending == 2 + MAX_PENDING_TRANSITIONS
    assert writes.dropped_transitions == 500
    store.failure = None
    await writes.flushed()
    kept = store.transitions("a", limit=10_000)
    assert len(kept) == MAX_PENDING_TRANSITIONS and kept[0].reason == f"r{MAX_PENDING_TRANSITIONS + 499}"
    await writes.close(1.0)


async def test_closing_during_a_stuck_write_neither_loses_nor_repeats_it() -> None:
    store = FrozenStore()
    writes = WriteBehind(store)
    store.thawed.clear()
    writes.write(record("a"), step("a", "first"))
    await asyncio.sleep(0.05)  # the flusher has handed it to the thread
    closing = asyncio.create_task(writes.close(5.0))
    writes.write(record("a"), step("a", "second"))
    await asyncio.sleep(0.05)
    store.thawed.set()
    await closing
    assert [t.reason for t in store.transitions("a")] == ["second", "first"]


async def test_closing_with_the_database_frozen_ends_within_its_bound_and_says_what_is_lost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = FrozenStore()
    writes = WriteBehind(store)
    store.thawed.clear()
    writes.write(record("a"), step("a"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await writes.close(0.3)
    assert loop.time() - started < 1.0
    assert "the store did not answer the last flush in time" in capsys.readouterr().out
    store.thawed.set()


async def test_a_degraded_write_is_the_stores_to_keep() -> None:
    class NodeCopyOnly(MemoryStore):
        """Written locally, the shared database unreachable: the store keeps it, not the queue."""

        def write_batch(self, records: Sequence[AgentRecord], transitions: Sequence[Transition]) -> None:
            super().write_batch(records, transitions)
            raise StoreDegraded("written to the node copy; the shared database is unreachable")

    store = NodeCopyOnly()
    writes = WriteBehind(store, FakeClock())
    writes.write(record("a"), step("a"))
    with pytest.raises(StoreDegraded):
        await writes.flushed("a")
    assert writes.pending == 0 and writes.failing  # not queued again: it would repeat the transition
    assert len(store.transitions("a")) == 1
    await writes.close(1.0)
