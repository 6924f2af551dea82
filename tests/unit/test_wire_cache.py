"""The cached ListAgents encoding equals the message built field by field, uptime included."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from opmasd.api import convert
from opmasd.api.wire_cache import AgentWireCache
from opmasd.core.clock import SYSTEM_CLOCK, utcnow
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, ExitInfo


def record(agent_id: str, running: bool = True) -> AgentRecord:
    now = utcnow()
    return AgentRecord(
        agent_id=agent_id,
        spec=AgentSpec(name=agent_id, command=("sleep", "1000"), environment=(("A", "1"),)),
        state=AgentState.RUNNING if running else AgentState.STOPPED,
        pid=4242 if running else None,
        pid_start_time=1.0 if running else None,
        started_at=now - timedelta(seconds=90.5) if running else None,
        started_monotonic=SYSTEM_CLOCK.monotonic() - 90.5 if running else None,
        last_exit=ExitInfo(3, None),
    )


def test_cached_list_equals_direct_conversion() -> None:
    cache = AgentWireCache()
    records = [record("a"), record("b", running=False), record("c" * 60)]
    listed, taken = cache.list_page(records, 4 << 20)
    assert taken == 3
    for got, rec in zip(listed.agents, records, strict=True):
        want = convert.agent_to_pb(rec)
        # Uptime is taken at each call: compare it apart, to the second.
        assert abs(got.status.uptime.seconds - want.status.uptime.seconds) <= 1
        got.status.ClearField("uptime")
        want.status.ClearField("uptime")
        assert got == want
    assert listed.agents[0].status.uptime.seconds == 0  # cleared above; the real one was 90
    assert not listed.agents[1].status.HasField("uptime")


def test_a_changed_record_is_encoded_anew() -> None:
    cache = AgentWireCache()
    rec = record("a")
    cache.list_page([rec], 4 << 20)[0]
    changed = replace(rec, state=AgentState.INACTIVE, updated_at=utcnow() + timedelta(seconds=1))
    assert cache.list_page([changed], 4 << 20)[0].agents[0].status.state == convert.state_to_pb(
        AgentState.INACTIVE
    )
    beat = replace(changed, last_heartbeat=utcnow())
    assert cache.list_page([beat], 4 << 20)[0].agents[0].status.HasField("last_heartbeat_time")


def test_uptime_is_current_at_each_call() -> None:
    cache = AgentWireCache()
    rec = record("a")
    first = cache.list_page([rec], 4 << 20)[0].agents[0].status.uptime.seconds
    assert 89 <= first <= 91
    older = replace(rec, started_monotonic=rec.started_monotonic - 100)  # type: ignore[operator]
    older.updated_at = rec.updated_at  # same cache key: only uptime differs
    assert cache.list_page([older], 4 << 20)[0].agents[0].status.uptime.seconds >= 189


def test_a_page_ends_before_it_outgrows_its_byte_budget() -> None:
    cache = AgentWireCache()
    records = [record(f"agent-{n}") for n in range(50)]
    one = len(cache.list_page(records[:1], 4 << 20)[0].SerializeToString())
    page, taken = cache.list_page(records, 10 * one)
    assert 9 <= taken <= 10 and len(page.SerializeToString()) <= 10 * one
    assert cache.list_page(records, 1)[1] == 1  # never empty: one agent always goes
