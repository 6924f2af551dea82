"""Heartbeat judging on a fake clock: the time rules, with no sleeping and no event loop timers."""

from __future__ import annotations

from opmasd.core.messages import Heartbeat
from opmasd.core.model import AgentRecord, AgentSpec, AgentState
from opmasd.manager.events import EventHub
from opmasd.manager.heartbeats import HealthSettings, HeartbeatJudge
from opmasd.manager.persistence import WriteBehind
from opmasd.manager.registry import AgentRegistry
from opmasd.testing.clock import FakeClock
from opmasd.testing.memory_store import MemoryStore

TIMEOUT = 90.0


def running_agent(registry: AgentRegistry, clock: FakeClock, agent_id: str = "a1") -> AgentRecord:
    rec = AgentRecord(agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("sleep", "1")), node="n1")
    rec.state, rec.pid, rec.started_at = AgentState.RUNNING, 4242, clock.now()
    rec.started_monotonic = clock.monotonic()
    registry.save(rec)
    return rec


def judge_parts() -> tuple[HeartbeatJudge, AgentRegistry, WriteBehind, FakeClock, MemoryStore]:
    clock, store = FakeClock(), MemoryStore()
    writes = WriteBehind(store)
    registry = AgentRegistry(writes, EventHub(), clock)
    judge = HeartbeatJudge(registry, writes, HealthSettings(heartbeat_timeout=TIMEOUT), clock)
    return judge, registry, writes, clock, store


def beat(judge: HeartbeatJudge, clock: FakeClock, agent_id: str = "a1") -> None:
    judge.on_heartbeat(Heartbeat(agent_id, "running", clock.now(), {}))


async def test_silence_longer_than_the_timeout_marks_inactive_and_a_heartbeat_brings_it_back() -> None:
    judge, registry, writes, clock, store = judge_parts()
    rec = running_agent(registry, clock)
    assert judge.mark_silent_inactive() == []  # the first connected check opens the grace
    clock.advance(1)
    beat(judge, clock)
    clock.advance(TIMEOUT)  # grace over; silent exactly the timeout: not yet
    assert judge.mark_silent_inactive() == []
    clock.advance(1)
    assert [r.agent_id for r in judge.mark_silent_inactive()] == ["a1"]
    assert rec.state is AgentState.INACTIVE and rec.state_reason.startswith("no heartbeat for 91s")
    beat(judge, clock)
    assert rec.state is AgentState.RUNNING and rec.state_reason == "heartbeat received again"
    assert await writes.flush()
    assert [t.state for t in store.transitions("a1")][:2] == [AgentState.RUNNING, AgentState.INACTIVE]


def test_nobody_is_judged_while_the_bus_is_down_nor_within_a_timeout_after_it_is_back() -> None:
    judge, registry, _, clock, _ = judge_parts()
    rec = running_agent(registry, clock)
    judge.mark_silent_inactive()
    beat(judge, clock)
    clock.advance(TIMEOUT * 2)
    judge.mark_silent_inactive(bus_connected=False)
    clock.advance(TIMEOUT * 5)
    assert judge.mark_silent_inactive(bus_connected=False) == []
    assert judge.mark_silent_inactive(bus_connected=True) == []  # back: the grace begins
    clock.advance(TIMEOUT - 1)
    assert judge.mark_silent_inactive() == [] and rec.state is AgentState.RUNNING
    clock.advance(2)
    assert judge.mark_silent_inactive() == [rec]


def test_an_agent_that_never_heartbeated_is_never_judged() -> None:
    judge, registry, _, clock, _ = judge_parts()
    rec = running_agent(registry, clock)
    judge.mark_silent_inactive()
    clock.advance(TIMEOUT * 10)
    assert judge.mark_silent_inactive() == [] and rec.state is AgentState.RUNNING


async def test_heartbeat_times_reach_the_store_in_one_batch_on_our_clock() -> None:
    judge, registry, writes, clock, store = judge_parts()
    for agent_id in ("a1", "a2", "a3"):
        running_agent(registry, clock, agent_id)
    for _ in range(100):
        clock.advance(0.01)
        for agent_id in ("a1", "a2", "a3"):
            beat(judge, clock, agent_id)
    assert await writes.flush()  # the agents' rows
    await writes.flush_heartbeats()
    assert writes.heartbeat_flushes == 1
    stored = {rec.agent_id: rec.last_heartbeat for rec in store.load_agents()}
    assert stored == dict.fromkeys(("a1", "a2", "a3"), clock.now())


def agent_with_interval(registry: AgentRegistry, clock: FakeClock, interval: float) -> AgentRecord:
    rec = running_agent(registry, clock)
    rec.spec = AgentSpec(name="a1", command=("sleep", "1"), heartbeat_interval=interval)
    return rec


def silent_for(judge: HeartbeatJudge, clock: FakeClock, seconds: float) -> list[str]:
    clock.advance(seconds)
    return [rec.agent_id for rec in judge.mark_silent_inactive()]


def test_each_agent_is_judged_on_three_of_its_own_intervals() -> None:
    judge, registry, _, clock, _ = judge_parts()
    agent_with_interval(registry, clock, 1.0)
    judge.mark_silent_inactive()
    clock.advance(0.5)
    beat(judge, clock)
    assert silent_for(judge, clock, 3.0) == []  # exactly three intervals: not yet
    assert silent_for(judge, clock, 0.1) == ["a1"]  # not the global 90 s


def test_a_long_interval_is_not_cut_short_by_the_global_timeout() -> None:
    judge, registry, _, clock, _ = judge_parts()
    agent_with_interval(registry, clock, 200.0)
    judge.mark_silent_inactive()
    clock.advance(1)
    beat(judge, clock)
    assert silent_for(judge, clock, TIMEOUT + 10) == []
    assert silent_for(judge, clock, 600 - TIMEOUT - 10) == []
    assert silent_for(judge, clock, 1) == ["a1"]


def test_an_agent_without_an_interval_gets_the_global_timeout() -> None:
    judge, registry, _, clock, _ = judge_parts()
    agent_with_interval(registry, clock, 0.0)
    judge.mark_silent_inactive()
    clock.advance(1)
    beat(judge, clock)
    assert silent_for(judge, clock, TIMEOUT) == []
    assert silent_for(judge, clock, 1) == ["a1"]


def test_a_wall_clock_step_marks_nobody_inactive() -> None:
    judge, registry, _, clock, _ = judge_parts()
    agent_with_interval(registry, clock, 1.0)
    judge.mark_silent_inactive()
    clock.advance(0.5)
    beat(judge, clock)
    clock.step_wall(3600)  # NTP, or an operator's date -s
    assert silent_for(judge, clock, 1.0) == []
    clock.step_wall(-7200)
    beat(judge, clock)
    assert silent_for(judge, clock, 1.0) == []


def test_after_a_bus_outage_each_agent_gets_its_own_deadline_again() -> None:
    judge, registry, _, clock, _ = judge_parts()
    agent_with_interval(registry, clock, 1.0)
    judge.mark_silent_inactive()
    clock.advance(0.5)
    beat(judge, clock)
    clock.advance(10)
    assert judge.mark_silent_inactive(bus_connected=False) == []
    assert judge.mark_silent_inactive(bus_connected=True) == []  # back: silence so far not counted
    assert silent_for(judge, clock, 3.0) == []
    assert silent_for(judge, clock, 0.1) == ["a1"]


def test_a_new_process_is_not_judged_by_its_predecessors_heartbeat() -> None:
    judge, registry, _, clock, _ = judge_parts()
    rec = agent_with_interval(registry, clock, 1.0)
    judge.mark_silent_inactive()
    clock.advance(0.5)
    beat(judge, clock)
    clock.advance(0.1)
    rec.pid, rec.started_monotonic, rec.heard_monotonic = 4343, clock.monotonic(), None  # restarted
    assert silent_for(judge, clock, 60) == []  # a plain program that never heartbeats
