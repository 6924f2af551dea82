"""The state machine's time rules, each pinned on a fake clock: no sleeps, no timing luck.

Every test here fails when the rule it names is broken in the supervisor or the restart policy
(backoff, stability window, crash loop, an operator's start, stop timeouts, re-adoption).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from opmasd.core.errors import FailedPrecondition
from opmasd.core.messages import Heartbeat
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, DesiredState, ProcessHandle, RestartPolicy
from opmasd.manager import AgentManager, ManagerSettings, RestartSettings
from opmasd.testing.clock import FakeClock
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

# No start window (the window's own rules are tested below, with one).
QUICK = {"name": "a", "command": ("sleep", "1000"), "start_seconds": 0.0}
RULES = RestartSettings(backoff_initial=1.0, backoff_max=8.0, stable_after=60.0, max_restarts=10)


class Rig:
    def __init__(self, restart: RestartSettings = RULES) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.runtime = FakeRuntime()
        settings = ManagerSettings(node="n1", restart=restart, monitoring_interval=3600.0)
        self.manager = AgentManager(self.store, self.runtime, settings, clock=self.clock)

    def rec(self, agent_id: str = "a") -> AgentRecord:
        return self.manager.get_agent(agent_id)

    async def settle(self) -> None:
        """Let every task that can run, run (the fake clock wakes sleepers synchronously), and
        the store's thread write what they queued (a few real milliseconds at most)."""
        idle_rounds = 0
        for _ in range(400):
            for _ in range(50):
                await asyncio.sleep(0)
            # Twice in a row: a write the thread just finished still wakes its waiter, which
            # may queue the next one (a commit, then the launch it allowed).
            idle_rounds = idle_rounds + 1 if self.manager._writes.pending == 0 else 0
            if idle_rounds == 2:
                return
            await asyncio.sleep(0.001)

    async def crash(self, exit_code: int = 1, agent_id: str = "a") -> float | None:
        """Crash the agent's process; the backoff delay chosen (None: no restart planned)."""
        self.runtime.crash(agent_id, exit_code=exit_code)
        await self.settle()
        rec = self.rec(agent_id)
        if rec.state is AgentState.RUNNING:
            return 0.0  # restarted at once
        if rec.state is not AgentState.BACKOFF:
            return None
        assert self.clock.sleepers, "in backoff, but no restart timer is waiting"
        return self.clock.sleepers[0] - self.clock.monotonic()

    async def wait_out_backoff(self, agent_id: str = "a", expect: AgentState = AgentState.RUNNING) -> None:
        delay = self.clock.sleepers[0] - self.clock.monotonic() if self.clock.sleepers else 0.0
        self.clock.advance(delay)
        await self.settle()
        assert self.rec(agent_id).state is expect


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    await r.manager.start(discover=False)
    await r.manager.create_agent(QUICK, start=True)
    yield r
    await r.manager.stop(stop_agents=False)


async def test_the_first_restart_is_immediate_then_the_delay_doubles_up_to_the_cap(rig: Rig) -> None:
    delays = []
    for _ in range(6):
        delay = await rig.crash()
        assert delay is not None
        delays.append(delay)
        if delay:
            await rig.wait_out_backoff()
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]


async def test_a_backoff_waits_its_whole_delay(rig: Rig) -> None:
    await rig.crash()
    assert await rig.crash() == 1.0
    rig.clock.advance(0.99)
    await rig.settle()
    assert rig.rec().state is AgentState.BACKOFF
    rig.clock.advance(0.01)
    await rig.settle()
    assert rig.rec().state is AgentState.RUNNING


async def test_the_failure_count_resets_after_running_for_stable_after(rig: Rig) -> None:
    await rig.crash()
    await rig.crash()
    await rig.wait_out_backoff()
    assert rig.rec().consecutive_failures == 2
    rig.clock.advance(RULES.stable_after)
    assert await rig.crash() == 0.0  # a stable run: this crash is a first one again
    assert rig.rec().consecutive_failures == 1


async def test_running_just_short_of_stable_after_does_not_reset(rig: Rig) -> None:
    await rig.crash()
    rig.clock.advance(RULES.stable_after - 0.5)
    assert await rig.crash() == 1.0
    assert rig.rec().consecutive_failures == 2


async def test_stability_is_measured_on_the_monotonic_clock_not_the_wall(rig: Rig) -> None:
    await rig.crash()
    rig.clock.step_wall(3600)  # the wall clock jumps an hour: the process did not run an hour
    assert await rig.crash() == 1.0


@pytest.mark.parametrize(
    ("policy", "exit_code"),
    [(RestartPolicy.ALWAYS, 0), (RestartPolicy.ALWAYS, 1), (RestartPolicy.ON_FAILURE, 1)],
)
async def test_a_crash_loop_ends_in_error_after_max_restarts(policy: RestartPolicy, exit_code: int) -> None:
    rig = Rig(RestartSettings(backoff_initial=1.0, backoff_max=2.0, stable_after=60.0, max_restarts=3))
    await rig.manager.start(discover=False)
    spec = {**QUICK, "restart_policy": policy}
    await rig.manager.create_agent(spec, start=True)
    try:
        for _ in range(3):
            assert await rig.crash(exit_code) is not None
            if rig.rec().state is AgentState.BACKOFF:
                await rig.wait_out_backoff()
        assert await rig.crash(exit_code) is None
        rec = rig.rec()
        assert rec.state is AgentState.ERROR and "crash loop" in rec.state_reason
        assert rec.restart_count == 3 and len(rig.runtime.launches) == 4
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_on_failure_does_not_restart_a_clean_exit(rig: Rig) -> None:
    assert await rig.crash(exit_code=0) is None
    assert rig.rec().state is AgentState.STOPPED


async def test_an_operators_start_resets_the_failure_count(rig: Rig) -> None:
    await rig.crash()
    await rig.crash()
    await rig.wait_out_backoff()
    await rig.manager.stop_agent("a")
    await rig.manager.start_agent("a")
    rec = rig.rec()
    assert rec.consecutive_failures == 0 and rec.restart_count == 0
    assert await rig.crash() == 0.0  # the next crash is a first one


async def test_a_stop_timeout_given_with_the_request_is_the_one_used(rig: Rig) -> None:
    rig.runtime.ignore_sigterm.add("a")
    await rig.manager.stop_agent("a", timeout=2.5)
    assert rig.runtime.terminations[-1] == ("a", 2.5)
    rig.runtime.ignore_sigterm.clear()
    await rig.manager.start_agent("a")
    await rig.manager.stop_agent("a")
    assert rig.runtime.terminations[-1] == ("a", AgentSpec(name="x", command=("x",)).stop_timeout)


async def test_a_re_adopted_agent_whose_desired_state_is_stopped_is_stopped() -> None:
    rig = Rig()
    rec = AgentRecord(agent_id="a", spec=AgentSpec(name="a", command=("sleep", "1")), node="n1")
    rec.state, rec.desired, rec.pid, rec.pid_start_time = AgentState.RUNNING, DesiredState.STOPPED, 777, 5.0
    rig.store.save_agent(rec)
    rig.runtime.alive_elsewhere[777] = 5.0
    await rig.manager.start(discover=False)
    try:
        await rig.settle()  # stopped in the background, once the daemon is up
        assert rig.rec().state is AgentState.STOPPED
        assert rig.runtime.terminations == [("a", rec.spec.stop_timeout)]
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_re_adopted_agents_to_stop_do_not_hold_the_daemon_start_and_stop_together() -> None:
    # Three adopted agents that ignore SIGTERM, each with a 30 s stop timeout: stopped one after
    # the other inside start(), the daemon (and its API) came up 90 s late.
    rig = Rig()
    for pid, agent_id in enumerate(("a", "b", "c"), start=700):
        rec = AgentRecord(
            agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("x",), stop_timeout=30.0), node="n1"
        )
        rec.state, rec.desired = AgentState.RUNNING, DesiredState.STOPPED
        rec.pid, rec.pid_start_time = pid, 5.0
        rig.store.save_agent(rec)
        rig.runtime.alive_elsewhere[pid] = 5.0
        rig.runtime.ignore_sigterm.add(agent_id)
    await asyncio.wait_for(rig.manager.start(discover=False), timeout=5.0)
    try:
        await rig.settle()
        assert sorted(rig.runtime.terminations) == [("a", 30.0), ("b", 30.0), ("c", 30.0)]
        assert {rig.rec(a).state for a in ("a", "b", "c")} == {AgentState.STOPPING}
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_a_launch_whose_pid_was_never_recorded_is_adopted_not_started_twice() -> None:
    rig = Rig()
    rec = AgentRecord(agent_id="a", spec=AgentSpec(name="a", command=("sleep", "1")), node="n1")
    rec.state, rec.desired = AgentState.STARTING, DesiredState.RUNNING
    rig.store.save_agent(rec)
    rig.runtime.unrecorded["a"] = ProcessHandle(888, rig.clock.monotonic() - 30)
    await rig.manager.start(discover=False)
    try:
        adopted = rig.rec()
        assert adopted.state is AgentState.RUNNING and adopted.pid == 888
        assert rig.runtime.launches == []
        assert 29 <= (adopted.uptime(rig.clock.monotonic()) or 0) <= 31
    finally:
        await rig.manager.stop(stop_agents=False)


# --- the start window (spec.start_seconds) -------------------------------------------------


async def windowed(rig: Rig, **spec: object) -> asyncio.Task[object]:
    """An operator's create-and-start of an agent with a 5 s start window, still waiting."""
    await rig.manager.start(discover=False)
    task = asyncio.ensure_future(
        rig.manager.create_agent(
            {"name": "a", "command": ("sleep", "1000"), "start_seconds": 5.0, **spec}, start=True
        )
    )
    await rig.settle()
    return task


async def test_starting_becomes_running_only_after_start_seconds() -> None:
    rig = Rig()
    task = await windowed(rig)
    try:
        assert rig.rec().state is AgentState.STARTING and rig.rec().pid is not None
        rig.clock.advance(4.9)
        await rig.settle()
        assert rig.rec().state is AgentState.STARTING and not task.done()
        rig.clock.advance(0.1)
        await rig.settle()
        assert rig.rec().state is AgentState.RUNNING and "up 5s" in rig.rec().state_reason
        await task  # the operator's start answered only now
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_an_exit_within_the_window_is_a_failed_start_even_with_code_0() -> None:
    rig = Rig()
    task = await windowed(rig, restart_policy=RestartPolicy.ON_FAILURE)
    try:
        rig.clock.advance(0.2)
        rig.runtime.crash("a", exit_code=0)
        await rig.settle()
        with pytest.raises(
            FailedPrecondition, match=r"^agent a failed to start: exited with code 0 after 0\.2s, within"
        ):
            await task
        rec = rig.rec()
        assert rec.consecutive_failures == 1 and rec.restart_count == 1  # counted by the policy
        assert rec.state is AgentState.STARTING  # restarted at once, in a new window
        assert any("failed to start" in t.reason for t in rig.store.transitions("a"))
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_a_failed_start_is_answered_only_once_its_reason_is_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The answer to a start waits for the start window's outcome; the outcome (here: the error
    # it failed with) must be in the store by then, as the outcome of a success is.
    rig = Rig()
    task = await windowed(rig, restart_policy=RestartPolicy.NEVER)
    try:
        slow = rig.store.write_batch

        def slow_write(*args: Any) -> None:
            time.sleep(0.2)  # the store's thread, not the loop
            slow(*args)

        monkeypatch.setattr(rig.store, "write_batch", slow_write)
        rig.runtime.crash("a", exit_code=0)
        with pytest.raises(FailedPrecondition, match="failed to start"):
            await task  # no settle(): what the answer waited for is all there is
        assert any("failed to start" in t.reason for t in rig.store.transitions("a"))
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_repeated_failed_starts_end_in_error() -> None:
    rig = Rig(RestartSettings(backoff_initial=1.0, backoff_max=2.0, stable_after=60.0, max_restarts=2))
    task = await windowed(rig)
    try:
        for _ in range(3):
            rig.runtime.crash("a", exit_code=1)
            await rig.settle()
            if rig.rec().state is AgentState.BACKOFF:
                await rig.wait_out_backoff(expect=AgentState.STARTING)
        assert rig.rec().state is AgentState.ERROR and "failed to start" in rig.rec().state_reason
        with pytest.raises(FailedPrecondition, match="failed to start"):
            await task
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_a_first_heartbeat_ends_the_window_early() -> None:
    rig = Rig()
    task = await windowed(rig)
    try:
        rig.clock.advance(0.5)
        rig.manager._heartbeats.on_heartbeat(Heartbeat("a", "running", rig.clock.now(), {}))  # as from NATS
        await rig.settle()
        assert rig.rec().state is AgentState.RUNNING and "first heartbeat" in rig.rec().state_reason
        await task
        rig.clock.advance(10)  # the window's timer, cancelled, changes nothing later
        await rig.settle()
        assert [t.state for t in rig.store.transitions("a")].count(AgentState.RUNNING) == 1
    finally:
        await rig.manager.stop(stop_agents=False)


async def test_a_stop_within_the_window_is_not_held_up_by_it() -> None:
    rig = Rig()
    task = await windowed(rig)
    try:
        stopped = await asyncio.wait_for(rig.manager.stop_agent("a"), 1)  # no clock advance needed
        assert stopped.record.state is AgentState.STOPPED
        with pytest.raises(FailedPrecondition, match="stopped within its start window"):
            await task
        await asyncio.wait_for(rig.manager.delete_agent("a"), 1)
    finally:
        await rig.manager.stop(stop_agents=False)
