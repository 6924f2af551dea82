"""Heartbeats drive running ↔ inactive; commands and metrics go through the bus interface."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from opmasd.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from opmasd.core.messages import CommandReply
from opmasd.core.model import AgentState
from opmasd.manager import AgentManager, HealthSettings, ManagerSettings, RestartSettings
from opmasd.testing.fake_bus import FakeBus
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

# No start window: these tests are about heartbeats after the start (test_state_rules has it).
SLEEP = {"name": "nagent", "command": ("sleep", "1000"), "start_seconds": 0.0}


@pytest.fixture
async def parts() -> AsyncIterator[tuple[AgentManager, MemoryStore, FakeRuntime, FakeBus]]:
    store, runtime, bus = MemoryStore(), FakeRuntime(), FakeBus("nats://127.0.0.1:4999")
    settings = ManagerSettings(
        node="n1",
        restart=RestartSettings(backoff_initial=0.01, backoff_max=0.05),
        health=HealthSettings(heartbeat_timeout=0.2),
        heartbeat_flush_interval=0.05,
        monitoring_interval=0.05,
    )
    manager = AgentManager(store, runtime, settings, bus=bus)
    await manager.start(discover=False)
    yield manager, store, runtime, bus
    await manager.stop(stop_agents=False)


async def wait_state(manager: AgentManager, agent_id: str, state: AgentState, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while manager.get_agent(agent_id).state is not state:
            await asyncio.sleep(0.01)


async def test_agents_get_the_nats_url(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, runtime, _ = parts
    await manager.create_agent(SLEEP, start=True)
    assert runtime.launches[-1].environment["NATS_URL"] == "nats://127.0.0.1:4999"


async def test_lost_heartbeat_goes_inactive_and_back(parts) -> None:  # type: ignore[no-untyped-def]
    manager, store, _, bus = parts
    await manager.create_agent(SLEEP, start=True)
    bus.heartbeat("nagent")
    await wait_state(manager, "nagent", AgentState.INACTIVE)
    assert "no heartbeat for" in manager.get_agent("nagent").state_reason
    bus.heartbeat("nagent")
    assert manager.get_agent("nagent").state is AgentState.RUNNING
    assert manager.get_agent("nagent").state_reason == "heartbeat received again"
    await manager._writes.flushed()
    states = [t.state for t in store.transitions("nagent")]
    assert states[:2] == [AgentState.RUNNING, AgentState.INACTIVE]


async def test_silent_plain_program_is_not_marked_inactive(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, _, _ = parts
    await manager.create_agent(SLEEP, start=True)
    await asyncio.sleep(0.5)
    assert manager.get_agent("nagent").state is AgentState.RUNNING


async def test_heartbeats_are_flushed_in_batches(parts) -> None:  # type: ignore[no-untyped-def]
    manager, store, _, bus = parts
    await manager.create_agent(SLEEP, start=True)
    for _ in range(500):
        bus.heartbeat("nagent")
    await asyncio.sleep(0.15)
    flushes = manager._writes.heartbeat_flushes
    assert 1 <= flushes <= 4, flushes  # a few flushes, not 500 writes
    stored = next(r for r in store.load_agents() if r.agent_id == "nagent")
    assert stored.last_heartbeat == manager.get_agent("nagent").last_heartbeat


async def test_restart_on_inactive(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, runtime, bus = parts
    await manager.create_agent({**SLEEP, "restart_on_inactive": True}, start=True)
    first = manager.get_agent("nagent").pid
    bus.heartbeat("nagent")

    async def restarted() -> None:
        while manager.get_agent("nagent").pid in (first, None):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(restarted(), 2)
    assert ("nagent", 10.0) in runtime.terminations
    assert manager.get_agent("nagent").restart_count == 1


async def test_send_command(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, _, bus = parts
    await manager.create_agent(SLEEP)
    with pytest.raises(FailedPrecondition, match="not running"):
        await manager.send_command("nagent", "ping", {})
    await manager.start_agent("nagent")
    bus.responders["nagent"] = lambda command, params: CommandReply("success", {"echo": command})
    reply = await manager.send_command("nagent", "ping", {"a": 1}, timeout=1.0)
    assert reply.result == {"echo": "ping"}
    del bus.responders["nagent"]
    with pytest.raises(DeadlineExceeded, match="nagent"):
        await manager.send_command("nagent", "ping", {}, timeout=0.05)
    with pytest.raises(InvalidArgument):
        await manager.send_command("nagent", " ", {})
    with pytest.raises(InvalidArgument):
        await manager.send_command("nagent", "ping", {}, timeout=-1)
    bus.connected = False
    with pytest.raises(Unavailable):
        await manager.send_command("nagent", "ping", {})


async def test_reported_metrics_are_kept(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, _, bus = parts
    await manager.create_agent(SLEEP, start=True)
    bus.metrics("nagent", {"events": 12})
    report = manager.reported_metrics("nagent")
    assert report is not None and report.metrics == {"events": 12}


async def test_without_a_bus_commands_are_unavailable() -> None:
    manager = AgentManager(MemoryStore(), FakeRuntime(), ManagerSettings(node="n1"))
    await manager.start(discover=False)
    try:
        await manager.create_agent(SLEEP, start=True)
        with pytest.raises(Unavailable, match="NATS"):
            await manager.send_command("nagent", "ping", {})
    finally:
        await manager.stop(stop_agents=False)


async def test_nats_outage_marks_nobody_inactive_and_gives_grace_after(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, runtime, bus = parts
    # restart_on_inactive: an outage that wrongly counted would restart it.
    await manager.create_agent({**SLEEP, "restart_on_inactive": True}, start=True)
    pid = manager.get_agent("nagent").pid
    bus.heartbeat("nagent")
    bus.connected = False
    await asyncio.sleep(0.5)  # well past heartbeat_timeout (0.2 s)
    assert manager.get_agent("nagent").state is AgentState.RUNNING
    bus.connected = True
    await asyncio.sleep(0.1)  # within the grace period after the bus is back
    assert manager.get_agent("nagent").state is AgentState.RUNNING
    assert runtime.terminations == [] and manager.get_agent("nagent").pid == pid
    # Still silent after the grace: now it counts (inactive, then restarted).
    async with asyncio.timeout(3):
        while not runtime.terminations:
            await asyncio.sleep(0.01)


async def test_readopted_agents_get_a_grace_period_after_a_daemon_restart() -> None:
    """Heartbeats stored before opmasd died are older than the timeout: that is not the agent's fault."""
    from datetime import timedelta

    from opmasd.core.clock import utcnow

    store = MemoryStore()
    settings = ManagerSettings(
        node="n1", health=HealthSettings(heartbeat_timeout=0.3), monitoring_interval=0.05
    )
    first = AgentManager(store, FakeRuntime(), settings, bus=FakeBus())
    await first.start(discover=False)
    await first.create_agent({**SLEEP, "restart_on_inactive": True}, start=True)
    handle = first.get_agent("nagent").handle
    assert handle is not None
    await first.stop(stop_agents=False)
    # opmasd was down for a minute; the agent heartbeated meanwhile, nobody listened.
    rec = next(r for r in store.load_agents() if r.agent_id == "nagent")
    rec.started_at = utcnow() - timedelta(seconds=120)
    rec.last_heartbeat = utcnow() - timedelta(seconds=60)
    store.save_agent(rec)

    runtime, bus = FakeRuntime(first_pid=9000), FakeBus()
    runtime.alive_elsewhere[handle.pid] = handle.start_time
    second = AgentManager(store, runtime, settings, bus=bus)
    await second.start(discover=False)
    try:
        await asyncio.sleep(0.15)  # within the grace: not judged on the stale time
        assert second.get_agent("nagent").state is AgentState.RUNNING
        bus.heartbeat("nagent")
        await asyncio.sleep(0.25)
        assert second.get_agent("nagent").state is AgentState.RUNNING
        assert runtime.terminations == [] and second.get_agent("nagent").pid == handle.pid
    finally:
        await second.stop(stop_agents=False)
