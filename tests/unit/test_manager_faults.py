"""Faults the manager must survive: a row the store refuses is dropped alone (its caller told why,
nothing behind it waiting), and requests for ids that do not exist leave nothing behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from opmasd.core.errors import InvalidArgument, NotFound, StoreError, StoreRejected, Unavailable
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, DesiredState, RestartPolicy, Transition
from opmasd.manager import AgentManager, ManagerSettings
from opmasd.manager.persistence import WriteBehind
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore


def record(agent_id: str) -> AgentRecord:
    return AgentRecord(agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("sleep", "1")))


async def test_a_refused_row_is_dropped_alone_and_its_waiter_told_why() -> None:
    store = MemoryStore()
    store.refuse = {"bad"}
    writes = WriteBehind(store)
    for agent_id in ("good-1", "bad", "good-2"):
        rec = record(agent_id)
        writes.write(rec, Transition(agent_id, AgentState.STOPPED, AgentState.STARTING, "x"))
    waiting_bad = asyncio.ensure_future(writes.flushed("bad"))
    waiting_good = asyncio.ensure_future(writes.flushed("good-1"))
    async with asyncio.timeout(2):  # never hangs
        with pytest.raises(StoreRejected, match="bad"):
            await waiting_bad
        await waiting_good
    assert {r.agent_id for r in store.load_agents()} == {"good-1", "good-2"}
    assert [t.state for t in store.transitions("good-2")] == [AgentState.STARTING]
    assert writes.pending == 0 and not writes.failing
    # What comes after is written at once, not held behind the refused row.
    writes.write(record("later"), None)
    async with asyncio.timeout(2):
        await writes.flushed("later")
    assert "later" in {r.agent_id for r in store.load_agents()}


async def test_a_registration_the_store_refuses_is_an_error_and_leaves_nothing_behind() -> None:
    store = MemoryStore()
    store.refuse = {"refused"}
    runtime = FakeRuntime()
    manager = AgentManager(store, runtime, ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        with pytest.raises(StoreRejected):
            await manager.create_agent({"name": "refused", "command": ("sleep", "100")}, start=True)
        with pytest.raises(NotFound):
            manager.get_agent("refused")
        assert runtime.launches == []  # refused before anything ran
        ok = await manager.create_agent({"name": "fine", "command": ("sleep", "100")})
        assert ok.agent_id == "fine" and "fine" in {r.agent_id for r in store.load_agents()}
    finally:
        await manager.stop(stop_agents=False)


async def test_an_update_the_store_refuses_keeps_the_stored_spec() -> None:
    store = MemoryStore()
    manager = AgentManager(store, FakeRuntime(), ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        await manager.create_agent({"name": "upd", "command": ("sleep", "100"), "description": "before"})
        store.refuse = {"upd"}
        with pytest.raises(StoreRejected):
            await manager.update_agent("upd", {"description": "after"})
        assert manager.get_agent("upd").spec.description == "before"
    finally:
        await manager.stop(stop_agents=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [("type", "t" * 65), ("version", "v" * 65), ("description", "d" * 1025), ("type", "a\x00b")],
)
async def test_bounded_fields_are_checked_before_the_store(field: str, value: str) -> None:
    manager = AgentManager(MemoryStore(), FakeRuntime(), ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        with pytest.raises(InvalidArgument) as raised:
            await manager.create_agent({"name": "long", "command": ("sleep", "1"), field: value})
        assert raised.value.violations[0].field == f"spec.{field}"
    finally:
        await manager.stop(stop_agents=False)


async def test_requests_for_unknown_ids_leave_no_lock_behind() -> None:
    manager = AgentManager(MemoryStore(), FakeRuntime(), ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        for n in range(200):
            with pytest.raises(NotFound):
                await manager.start_agent(f"ghost-{n}")
            with pytest.raises(NotFound):
                await manager.delete_agent(f"ghost-{n}")
        assert manager._supervisor._locks == {}
    finally:
        await manager.stop(stop_agents=False)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"command": ("sleep",) + ("1",) * 2000}, "spec.command"),
        ({"command": ("sleep", "x" * 9000)}, "spec.command"),
        ({"environment": {f"K{n}": "v" for n in range(600)}}, "spec.environment"),
        ({"environment": {"K": "v" * 40_000}}, "spec.environment"),
        ({"environment": {f"K{n}": "v" * 30_000 for n in range(5)}}, "spec"),
    ],
)
async def test_specs_have_bounded_sizes(fields: dict[str, object], field: str) -> None:
    manager = AgentManager(MemoryStore(), FakeRuntime(), ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        with pytest.raises(InvalidArgument) as raised:
            await manager.create_agent({"name": "big", "command": ("sleep", "1"), **fields})
        assert raised.value.violations[0].field == field, raised.value.violations
        with pytest.raises(NotFound):
            manager.get_agent("big")
    finally:
        await manager.stop(stop_agents=False)


class StallingStore(MemoryStore):
    """A store whose commits can be held mid-call, then fail: a database that stops answering."""

    def __init__(self) -> None:
        super().__init__()
        self.stall = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def commit_rows(self, records: Sequence[AgentRecord]) -> None:
        if self.stall:
            self.entered.set()
            self.release.wait(10)
            raise StoreError("the database went away")
        super().commit_rows(records)


@pytest.mark.parametrize(
    ("change", "fields"),
    [("stop", {}), ("update", {"restart_policy": RestartPolicy.NEVER})],
)
async def test_an_exit_during_a_refused_change_is_judged_on_what_was_committed(
    change: str, fields: dict[str, object]
) -> None:
    store, runtime = StallingStore(), FakeRuntime()
    manager = AgentManager(store, runtime, ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        spec = {"name": "a", "command": ("sleep", "100"), "restart_policy": RestartPolicy.ALWAYS}
        await manager.create_agent(spec, start=True)
        first = manager.get_agent("a").pid
        store.stall = True
        call = manager.stop_agent("a") if change == "stop" else manager.update_agent("a", fields)
        pending = asyncio.ensure_future(call)
        await asyncio.to_thread(store.entered.wait, 5)
        runtime.crash("a", exit_code=0)  # while the change waits for its commit
        store.release.set()
        with pytest.raises(Unavailable):
            await pending
        # The change was refused: the exit is judged on the policy and desired state committed
        # (always, running), so the agent is restarted, not left stopped.
        async with asyncio.timeout(5):
            while manager.get_agent("a").pid in (None, first):
                await asyncio.sleep(0.01)
        rec = manager.get_agent("a")
        assert rec.desired is DesiredState.RUNNING and rec.spec.restart_policy is RestartPolicy.ALWAYS
    finally:
        store.stall = False
        await manager.stop(stop_agents=False)


class LostReplyStore(MemoryStore):
    """Commits land, but the caller hears a failure: a connection cut after COMMIT was sent."""

    lose_replies = False

    def commit_rows(self, records: Sequence[AgentRecord]) -> None:
        super().commit_rows(records)
        if self.lose_replies:
            raise StoreError("server closed the connection unexpectedly")


async def test_a_registration_whose_commit_reply_was_lost_is_removed_again() -> None:
    store = LostReplyStore()
    manager = AgentManager(store, FakeRuntime(), ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        await manager.create_agent({"name": "kept", "command": ("sleep", "100")})
        store.lose_replies = True
        with pytest.raises(Unavailable):
            await manager.create_agent({"name": "ghost", "command": ("sleep", "100")})
        store.lose_replies = False
        with pytest.raises(NotFound):
            manager.get_agent("ghost")
        # The write landed after all; the undo takes it out, so no restart finds a phantom.
        await manager.create_agent({"name": "later", "command": ("sleep", "100")})
        assert {r.agent_id for r in store.load_agents()} == {"kept", "later"}
    finally:
        await manager.stop(stop_agents=False)
