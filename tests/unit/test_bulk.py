"""Bulk start, stop and restart: what a request selects, each agent's own outcome, and all of
them worked on at once (over the in-memory store and the fake runtime)."""

from __future__ import annotations

import asyncio

import pytest

from opmasd.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
    StoreRejected,
    Unavailable,
)
from opmasd.core.labels import parse_selector
from opmasd.core.model import AgentState, DesiredState
from opmasd.manager import AgentFilter, AgentManager, ManagerSettings, RestartSettings, Selection
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

FAST = RestartSettings(backoff_initial=0.01, backoff_max=0.05, stable_after=10.0, max_restarts=3)


def settings() -> ManagerSettings:
    return ManagerSettings(node="n1", restart=FAST, monitoring_interval=60.0)


def agent(name: str, **labels: str) -> dict[str, object]:
    return {"name": name, "command": ("sleep", "1000"), "start_seconds": 0.0, "labels": labels}


@pytest.fixture
async def fleet_and_store():
    store, runtime = MemoryStore(), FakeRuntime()
    manager = AgentManager(store, runtime, settings())
    await manager.start(discover=False)
    await manager.create_agent(agent("web-1", env="prod", role="web"), start=True)
    await manager.create_agent(agent("web-2", env="prod", role="web"), start=True)
    await manager.create_agent(agent("probe", env="dev", role="probe"), start=True)
    await manager.create_agent(agent("plain"), start=True)
    yield manager, runtime, store
    await manager.stop(stop_agents=False)


@pytest.fixture
def fleet(fleet_and_store):
    manager, runtime, _ = fleet_and_store
    return manager, runtime


def states(manager: AgentManager) -> dict[str, AgentState]:
    return {rec.agent_id: rec.state for rec in manager.list_agents()}


async def test_stop_by_selector_stops_exactly_the_matching_agents(fleet) -> None:
    manager, runtime = fleet
    outcomes = await manager.stop_agents(Selection(label_selector="env=prod,role!=probe"))
    assert [o.agent_id for o in outcomes] == ["web-1", "web-2"]
    assert all(o.error is None and o.result is not None and o.result.changed for o in outcomes)
    assert states(manager) == {
        "plain": AgentState.RUNNING,
        "probe": AgentState.RUNNING,
        "web-1": AgentState.STOPPED,
        "web-2": AgentState.STOPPED,
    }
    assert manager.get_agent("web-1").desired is DesiredState.STOPPED
    assert set(runtime.processes) == {"plain", "probe"}


async def test_all_then_start_all_reports_unchanged_ones(fleet) -> None:
    manager, runtime = fleet
    await manager.stop_agent("probe")
    outcomes = await manager.start_agents(Selection(all=True))
    changed = {o.agent_id: o.result.changed for o in outcomes if o.result is not None}
    assert changed == {"plain": False, "probe": True, "web-1": False, "web-2": False}
    stopped = await manager.stop_agents(Selection(all=True))
    assert len(stopped) == 4 and not runtime.processes


async def test_named_ids_each_get_their_own_outcome(fleet) -> None:
    manager, _ = fleet
    outcomes = await manager.restart_agents(Selection(agent_ids=("web-2", "ghost", "web-2", "probe")))
    by_id = {o.agent_id: o for o in outcomes}
    assert list(by_id) == ["ghost", "probe", "web-2"]  # in id order, each once
    assert isinstance(by_id["ghost"].error, NotFound)
    assert by_id["probe"].result is not None and by_id["probe"].result.changed
    assert by_id["web-2"].result is not None and by_id["web-2"].result.record.restart_count == 0


async def test_an_empty_or_ambiguous_selection_is_refused(fleet) -> None:
    manager, _ = fleet
    with pytest.raises(InvalidArgument, match="selects no agent"):
        await manager.stop_agents(Selection())
    with pytest.raises(InvalidArgument, match="only one of agent_ids, label_selector and all"):
        await manager.stop_agents(Selection(agent_ids=("web-1",), all=True))
    with pytest.raises(InvalidArgument, match="label_selector"):
        await manager.stop_agents(Selection(label_selector="env in (prod"))
    with pytest.raises(InvalidArgument) as bad_ids:
        await manager.stop_agents(Selection(agent_ids=("web-1", "Bad Id", "manager")))
    assert [v.field for v in bad_ids.value.violations] == ["agent_ids", "agent_ids"]
    with pytest.raises(InvalidArgument, match="timeout"):
        await manager.stop_agents(Selection(all=True), timeout=-1)
    assert set(states(manager).values()) == {AgentState.RUNNING}  # nothing was touched


async def test_a_selector_that_matches_nothing_is_an_empty_result(fleet) -> None:
    manager, _ = fleet
    assert await manager.stop_agents(Selection(label_selector="env=staging")) == []


async def test_agents_of_another_node_are_not_selected_but_named_ones_are_refused(fleet) -> None:
    manager, _ = fleet
    manager.get_agent("probe").node = "elsewhere"
    outcomes = await manager.stop_agents(Selection(label_selector="role"))
    assert [o.agent_id for o in outcomes] == ["web-1", "web-2"]
    (named,) = await manager.stop_agents(Selection(agent_ids=("probe",)))
    assert isinstance(named.error, FailedPrecondition) and "elsewhere" in str(named.error)


async def test_the_agents_are_stopped_concurrently(fleet) -> None:
    """Every termination is under way before the first one is allowed to finish: a bulk stop
    of slow agents takes one agent's time, not the sum."""
    manager, runtime = fleet
    entered: list[str] = []
    release = asyncio.Event()
    real_terminate = runtime.terminate

    async def slow_terminate(agent_id: str, timeout: float) -> None:
        entered.append(agent_id)
        await release.wait()
        await real_terminate(agent_id, timeout)

    runtime.terminate = slow_terminate
    stopping = asyncio.ensure_future(manager.stop_agents(Selection(all=True)))

    async def all_entered() -> None:
        while len(entered) < 4:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(all_entered(), 2)
    assert not stopping.done()
    release.set()
    outcomes = await asyncio.wait_for(stopping, 2)
    assert sorted(entered) == ["plain", "probe", "web-1", "web-2"] and len(outcomes) == 4


@pytest.mark.parametrize("operation", ["stop_agents", "restart_agents"])
async def test_every_sigterm_goes_out_in_one_sweep_before_any_agent_is_waited_for(fleet, operation) -> None:
    """So that the processes end together, not one after another's bookkeeping."""
    manager, runtime = fleet
    begun_at_first_terminate: list[list[str]] = []
    real_terminate = runtime.terminate

    async def terminate(agent_id: str, timeout: float) -> None:
        begun_at_first_terminate.append(list(runtime.terminations_begun))
        await real_terminate(agent_id, timeout)

    runtime.terminate = terminate  # type: ignore[method-assign]
    await manager.stop_agent("probe")  # one at a time: no sweep
    assert runtime.terminations_begun == []
    outcomes = await getattr(manager, operation)(Selection(all=True))
    assert all(o.error is None for o in outcomes)
    assert begun_at_first_terminate[1] == ["plain", "web-1", "web-2"]  # not probe: no process


async def test_a_bulk_stop_finishes_when_its_caller_leaves(fleet) -> None:
    manager, runtime = fleet
    release = asyncio.Event()
    real_terminate = runtime.terminate

    async def slow_terminate(agent_id: str, timeout: float) -> None:
        await release.wait()
        await real_terminate(agent_id, timeout)

    runtime.terminate = slow_terminate
    caller = asyncio.ensure_future(manager.stop_agents(Selection(all=True)))
    await asyncio.sleep(0.01)
    caller.cancel()
    release.set()

    async def all_stopped() -> None:
        while set(states(manager).values()) != {AgentState.STOPPED}:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(all_stopped(), 2)


async def test_list_filters_by_label_selector(fleet) -> None:
    manager, _ = fleet
    picked = manager.list_agents(AgentFilter(labels=parse_selector("role in (web,probe),env!=dev")))
    assert [rec.agent_id for rec in picked] == ["web-1", "web-2"]


async def test_labels_are_validated_and_updated_as_a_whole(fleet) -> None:
    manager, _ = fleet
    with pytest.raises(InvalidArgument, match=r"spec\.labels"):
        await manager.create_agent(agent("bad", **{"no good": "x"}))
    rec = await manager.update_agent("plain", {"labels": {"tier": "backend"}})
    assert rec.spec.label_map == {"tier": "backend"}
    rec = await manager.update_agent("plain", {"labels": {}})
    assert rec.spec.labels == ()


async def test_nothing_is_stopped_when_the_desired_states_cannot_be_committed(fleet_and_store) -> None:
    """Acknowledged means committed, in bulk too: with the database down every agent's outcome
    is UNAVAILABLE, its desired state is what it was, and its process still runs."""
    manager, runtime, store = fleet_and_store
    store.failure = StoreError("database is down")
    outcomes = await manager.stop_agents(Selection(label_selector="env=prod"))
    assert [o.agent_id for o in outcomes] == ["web-1", "web-2"]
    assert all(isinstance(o.error, Unavailable) and "undone" in str(o.error) for o in outcomes)
    assert set(runtime.processes) == {"plain", "probe", "web-1", "web-2"}
    assert runtime.terminations_begun == [], "signalled before its stop was committed"
    assert manager.get_agent("web-1").desired is DesiredState.RUNNING
    store.failure = None
    assert [o.error for o in await manager.stop_agents(Selection(label_selector="env=prod"))] == [None, None]
    assert set(runtime.processes) == {"plain", "probe"}


async def test_a_refused_row_fails_its_agent_alone(fleet_and_store) -> None:
    manager, runtime, store = fleet_and_store
    store.refuse = {"web-2"}
    outcomes = {o.agent_id: o for o in await manager.stop_agents(Selection(all=True))}
    assert isinstance(outcomes["web-2"].error, StoreRejected)
    assert "web-2" in runtime.processes and manager.get_agent("web-2").desired is DesiredState.RUNNING
    assert "web-2" not in runtime.terminations_begun
    assert [a for a, o in outcomes.items() if o.error is None] == ["plain", "probe", "web-1"]
    assert set(runtime.processes) == {"web-2"}


async def test_a_failed_start_is_that_agents_outcome(fleet_and_store) -> None:
    manager, runtime, _ = fleet_and_store
    await manager.stop_agents(Selection(all=True))
    runtime.fail_launch["probe"] = "no such program"
    outcomes = {o.agent_id: o for o in await manager.start_agents(Selection(all=True))}
    assert isinstance(outcomes["probe"].error, FailedPrecondition)
    assert {a for a, o in outcomes.items() if o.result is not None and o.result.changed} == {
        "plain",
        "web-1",
        "web-2",
    }


def _gate(runtime: FakeRuntime, slow: str) -> asyncio.Event:
    """Hold the termination of agent `slow` until the returned event is set."""
    release = asyncio.Event()
    real_terminate = runtime.terminate

    async def terminate(agent_id: str, timeout: float) -> None:
        if agent_id == slow:
            await release.wait()
        await real_terminate(agent_id, timeout)

    runtime.terminate = terminate  # type: ignore[method-assign]
    return release


async def test_a_slow_agent_in_a_bulk_stop_holds_up_only_itself(fleet) -> None:
    manager, runtime = fleet
    release = _gate(runtime, "web-2")
    bulk = asyncio.ensure_future(manager.stop_agents(Selection(label_selector="env=prod")))

    async def web_1_stopped() -> None:
        while manager.get_agent("web-1").state is not AgentState.STOPPED:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(web_1_stopped(), 2)
    # web-1's stop is over: its lock is free although web-2 still stops.
    restarted = await asyncio.wait_for(manager.start_agent("web-1"), 2)
    assert restarted.changed and not bulk.done()
    release.set()
    outcomes = await asyncio.wait_for(bulk, 2)
    assert [o.error for o in outcomes] == [None, None]


async def test_an_agent_relabelled_while_the_bulk_waits_for_its_lock_is_left_alone(fleet) -> None:
    manager, runtime = fleet
    release = _gate(runtime, "probe")
    holding = asyncio.ensure_future(manager.stop_agent("probe"))  # holds probe's lock
    await asyncio.sleep(0.01)
    await manager.update_agent("web-1", {"labels": {"role": "probe"}})
    # Selects probe, web-1 (sorted) ... and waits for probe's lock.
    bulk = asyncio.ensure_future(manager.stop_agents(Selection(label_selector="role in (probe,web)")))
    await asyncio.sleep(0.01)
    await manager.update_agent("web-2", {"labels": {"role": "gone"}})  # after it was selected
    release.set()
    await holding
    outcomes = await asyncio.wait_for(bulk, 2)
    assert [o.agent_id for o in outcomes] == ["probe", "web-1"]
    assert manager.get_agent("web-2").state is AgentState.RUNNING
