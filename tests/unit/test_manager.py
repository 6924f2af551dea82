"""The manager's state machine, restart policy and reconciliation, over in-memory parts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from opmasd.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
    Unavailable,
)
from opmasd.core.model import AgentState, DesiredState, RestartPolicy
from opmasd.manager import AgentFilter, AgentManager, ManagerSettings, RestartSettings
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

FAST = RestartSettings(backoff_initial=0.01, backoff_max=0.05, stable_after=10.0, max_restarts=3)


def settings(**kw: object) -> ManagerSettings:
    base: dict[str, object] = {"node": "n1", "restart": FAST, "monitoring_interval": 60.0}
    base.update(kw)
    return ManagerSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
async def parts():
    store, runtime = MemoryStore(), FakeRuntime()
    manager = AgentManager(store, runtime, settings())
    await manager.start(discover=False)
    yield manager, store, runtime
    await manager.stop(stop_agents=False)


async def wait_state(manager: AgentManager, agent_id: str, state: AgentState, timeout: float = 2.0) -> None:
    async def poll() -> None:
        while manager.get_agent(agent_id).state is not state:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


# No start window: these tests are about what happens after a start (test_state_rules has it).
SLEEP = {"name": "sleeper", "command": ("sleep", "1000"), "start_seconds": 0.0}


async def test_register_start_stop_records_every_transition(parts) -> None:
    manager, store, runtime = parts
    rec = await manager.create_agent(SLEEP)
    assert rec.agent_id == "sleeper" and rec.state is AgentState.STOPPED
    result = await manager.start_agent("sleeper")
    assert result.changed and result.record.state is AgentState.RUNNING and result.record.pid
    assert runtime.launches[-1].environment["AGENT_ID"] == "sleeper"
    again = await manager.start_agent("sleeper")
    assert not again.changed and "already running" in again.message
    stopped = await manager.stop_agent("sleeper")
    assert stopped.changed and stopped.record.state is AgentState.STOPPED
    assert stopped.record.desired is DesiredState.STOPPED
    assert not (await manager.stop_agent("sleeper")).changed
    states = [t.state for t in reversed(store.transitions("sleeper"))]
    assert states == [AgentState.STARTING, AgentState.RUNNING, AgentState.STOPPING, AgentState.STOPPED]
    assert all(t.reason for t in store.transitions("sleeper"))


async def test_crash_restarts_then_crash_loop_goes_to_error(parts) -> None:
    manager, store, runtime = parts
    await manager.create_agent(SLEEP, start=True)
    first_pid = manager.get_agent("sleeper").pid
    runtime.crash("sleeper", exit_code=1)
    await wait_state(manager, "sleeper", AgentState.RUNNING)
    rec = manager.get_agent("sleeper")
    assert rec.pid != first_pid and rec.restart_count == 1 and rec.last_exit and rec.last_exit.exit_code == 1
    for _ in range(FAST.max_restarts):
        runtime.crash("sleeper", exit_code=1)
        await asyncio.sleep(0)
        if manager.get_agent("sleeper").state is AgentState.ERROR:
            break
        await wait_state(manager, "sleeper", AgentState.RUNNING)
    await wait_state(manager, "sleeper", AgentState.ERROR)
    assert "crash loop" in manager.get_agent("sleeper").state_reason
    assert manager.get_agent("sleeper").desired is DesiredState.RUNNING
    assert any(t.state is AgentState.BACKOFF for t in store.transitions("sleeper"))


async def test_restart_policy_on_failure_leaves_clean_exit_stopped(parts) -> None:
    manager, _, runtime = parts
    await manager.create_agent(SLEEP, start=True)
    runtime.crash("sleeper", exit_code=0)
    await asyncio.sleep(0.01)
    rec = manager.get_agent("sleeper")
    assert rec.state is AgentState.STOPPED and "exited with code 0" in rec.state_reason


async def test_restart_policy_never_puts_failure_in_error(parts) -> None:
    manager, _, runtime = parts
    await manager.create_agent({**SLEEP, "restart_policy": RestartPolicy.NEVER}, start=True)
    runtime.crash("sleeper", exit_code=None, signal=9)
    await asyncio.sleep(0.01)
    assert manager.get_agent("sleeper").state is AgentState.ERROR
    assert "SIGKILL" in manager.get_agent("sleeper").state_reason


async def test_stop_during_backoff_cancels_the_restart(parts) -> None:
    manager, _, runtime = parts
    await manager.create_agent(SLEEP, start=True)
    runtime.crash("sleeper")
    await wait_state(manager, "sleeper", AgentState.RUNNING)
    runtime.crash("sleeper")  # second failure: waits backoff_initial
    assert manager.get_agent("sleeper").state is AgentState.BACKOFF
    await manager.stop_agent("sleeper")
    await asyncio.sleep(0.05)
    assert manager.get_agent("sleeper").state is AgentState.STOPPED
    assert "sleeper" not in runtime.processes


async def test_launch_failure_is_error_with_reason(parts) -> None:
    manager, _, runtime = parts
    await manager.create_agent(SLEEP)
    runtime.fail_launch["sleeper"] = "program not found"
    with pytest.raises(FailedPrecondition, match="program not found"):
        await manager.start_agent("sleeper")
    assert manager.get_agent("sleeper").state is AgentState.ERROR


async def test_bad_inputs_name_the_field(parts) -> None:
    manager, _, _ = parts
    with pytest.raises(NotFound, match="nope"):
        manager.get_agent("nope")
    with pytest.raises(InvalidArgument) as bad_id:
        await manager.start_agent("Bad Id!")
    assert bad_id.value.violations[0].field == "agent_id"
    with pytest.raises(InvalidArgument) as empty:
        await manager.create_agent({"name": "", "command": ("sleep", "1")})
    assert [v.field for v in empty.value.violations] == ["spec.name"]
    with pytest.raises(InvalidArgument) as neg:
        await manager.create_agent({"name": "x", "command": ("sleep", "1"), "stop_timeout": -1.0})
    assert [v.field for v in neg.value.violations] == ["spec.stop_timeout"]
    with pytest.raises(InvalidArgument) as missing:
        await manager.create_agent({"name": "x", "command": ("/no/such/program",)})
    assert [v.field for v in missing.value.violations] == ["spec.command"]
    with pytest.raises(InvalidArgument):
        await manager.stop_agent("x", timeout=-2)
    await manager.create_agent(SLEEP)
    with pytest.raises(AlreadyExists):
        await manager.create_agent(SLEEP)
    assert len(manager.list_agents()) == 1


async def test_delete_is_idempotent_and_stops_the_agent(parts) -> None:
    manager, store, runtime = parts
    await manager.create_agent(SLEEP, start=True)
    deleted = (await manager.delete_agent("sleeper")).changed
    assert deleted and "sleeper" not in runtime.processes
    again = (await manager.delete_agent("sleeper")).changed
    assert not again
    with pytest.raises(NotFound):
        manager.get_agent("sleeper")
    assert manager.list_agents() == []
    # A tombstone is kept, and a new registration under the same id revives it.
    assert [r.deleted for r in store.load_agents()] == [True]
    await manager.create_agent(SLEEP)
    assert manager.get_agent("sleeper").state is AgentState.STOPPED


async def test_update_changes_spec_and_validates(parts) -> None:
    manager, _, _ = parts
    await manager.create_agent(SLEEP)
    rec = await manager.update_agent("sleeper", {"stop_timeout": 3.0, "environment": {"A": "1"}})
    assert rec.spec.stop_timeout == 3.0 and rec.spec.env == {"A": "1"}
    with pytest.raises(InvalidArgument):
        await manager.update_agent("sleeper", {"stop_timeout": -3.0})
    assert manager.get_agent("sleeper").spec.stop_timeout == 3.0


async def test_list_filters(parts) -> None:
    manager, _, _ = parts
    await manager.create_agent({**SLEEP, "name": "a", "type": "t1"}, start=True)
    await manager.create_agent({**SLEEP, "name": "b", "type": "t2"})
    assert [r.agent_id for r in manager.list_agents(AgentFilter(state=AgentState.RUNNING))] == ["a"]
    assert [r.agent_id for r in manager.list_agents(AgentFilter(type="t2"))] == ["b"]
    assert manager.list_agents(AgentFilter(node="other")) == []


async def test_daemon_restart_readopts_live_and_restarts_vanished() -> None:
    store, runtime = MemoryStore(), FakeRuntime()
    first = AgentManager(store, runtime, settings())
    await first.start(discover=False)
    await first.create_agent({**SLEEP, "name": "alive"}, start=True)
    await first.create_agent({**SLEEP, "name": "gone"}, start=True)
    await first.create_agent({**SLEEP, "name": "idle"})
    alive = first.get_agent("alive").handle
    # opmasd is killed: "alive" survives, "gone" died meanwhile.
    assert alive is not None
    await first.stop(stop_agents=False)

    runtime2 = FakeRuntime(first_pid=5000)
    runtime2.alive_elsewhere[alive.pid] = alive.start_time
    second = AgentManager(store, runtime2, settings())
    await second.start(discover=False)
    try:
        assert second.get_agent("alive").pid == alive.pid
        assert second.get_agent("alive").state is AgentState.RUNNING
        assert "re-adopted" in second.get_agent("alive").state_reason
        gone = second.get_agent("gone")
        assert gone.state is AgentState.RUNNING and gone.pid != alive.pid
        assert [r.agent_id for r in runtime2.launches] == ["gone"]
        assert second.get_agent("idle").state is AgentState.STOPPED
    finally:
        await second.stop(stop_agents=False)


async def test_stale_pid_is_not_adopted() -> None:
    store, runtime = MemoryStore(), FakeRuntime()
    first = AgentManager(store, runtime, settings())
    await first.start(discover=False)
    await first.create_agent(SLEEP, start=True)
    handle = first.get_agent("sleeper").handle
    assert handle is not None
    await first.stop(stop_agents=False)
    runtime2 = FakeRuntime(first_pid=5000)
    runtime2.alive_elsewhere[handle.pid] = handle.start_time + 99  # same PID, another process
    second = AgentManager(store, runtime2, settings())
    await second.start(discover=False)
    try:
        assert second.get_agent("sleeper").pid != handle.pid
        assert len(runtime2.launches) == 1
    finally:
        await second.stop(stop_agents=False)


async def test_shutdown_stops_agents_but_keeps_desired_state() -> None:
    store, runtime = MemoryStore(), FakeRuntime()
    manager = AgentManager(store, runtime, settings())
    await manager.start(discover=False)
    await manager.create_agent(SLEEP, start=True)
    await manager.stop(stop_agents=True)
    rec = next(r for r in store.load_agents() if r.agent_id == "sleeper")
    assert rec.state is AgentState.STOPPED and rec.desired is DesiredState.RUNNING
    again = AgentManager(store, FakeRuntime(), settings())
    await again.start(discover=False)
    try:
        assert again.get_agent("sleeper").state is AgentState.RUNNING
    finally:
        await again.stop(stop_agents=False)


async def test_events_are_published(parts) -> None:
    manager, _, _ = parts
    sub = manager.watch()
    await manager.create_agent(SLEEP, start=True)
    seen = []
    async for event in sub:
        seen.append(event.transition.state)
        if event.transition.state is AgentState.RUNNING:
            break
    assert seen == [AgentState.STARTING, AgentState.RUNNING]


def write_manifest(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "agent.yaml").write_text(text)


async def test_discovery_registers_reports_errors_and_respects_deletion(tmp_path: Path) -> None:
    write_manifest(tmp_path / "good", "name: good\nentrypoint: sleep 100\nautostart: true\n")
    write_manifest(tmp_path / "broken", "name: [unclosed\n")
    write_manifest(tmp_path / "_template", "name: template\nentrypoint: sleep 1\n")
    write_manifest(tmp_path / "test_x", "name: testx\nentrypoint: sleep 1\n")
    write_manifest(tmp_path / "noentry", "name: noentry\n")
    manager = AgentManager(MemoryStore(), FakeRuntime(), settings(agent_dirs=(tmp_path,)))
    await manager.start()
    try:
        report = manager.last_discovery
        assert [a.agent_id for a in report.agents] == ["good"] and report.agents[0].new
        # Autostarted, not waited for: discovery goes on while the start window runs (1 s).
        assert manager.get_agent("good").state is AgentState.STARTING
        await wait_state(manager, "good", AgentState.RUNNING)
        errors = {e.path.parent.name: e.message for e in report.errors}
        assert set(errors) == {"broken", "noentry"}
        assert "invalid YAML" in errors["broken"] and "entrypoint" in errors["noentry"]
        again = await manager.discover()
        assert not again.agents[0].new
        await manager.delete_agent("good")
        await manager.discover()
        with pytest.raises(NotFound):
            manager.get_agent("good")
    finally:
        await manager.stop(stop_agents=False)


async def test_agents_of_another_node_are_listed_but_not_run() -> None:
    store = MemoryStore()
    other = AgentManager(store, FakeRuntime(), settings(node="n2"))
    await other.start(discover=False)
    await other.create_agent(SLEEP, start=True)
    await other.stop(stop_agents=False)
    runtime = FakeRuntime(first_pid=7000)
    manager = AgentManager(store, runtime, settings(node="n1"))
    await manager.start(discover=False)
    try:
        assert [r.node for r in manager.list_agents()] == ["n2"]
        assert runtime.launches == []
        with pytest.raises(FailedPrecondition, match="runs on node 'n2'"):
            await manager.stop_agent("sleeper")
    finally:
        await manager.stop(stop_agents=False)


async def test_a_burst_of_changes_is_one_store_transaction() -> None:
    class CountingStore(MemoryStore):
        batches = 0

        def write_batch(self, records, transitions):  # type: ignore[no-untyped-def]
            CountingStore.batches += 1
            super().write_batch(records, transitions)

    store = CountingStore()
    manager = AgentManager(store, FakeRuntime(), settings())
    await manager.start(discover=False)
    try:
        for i in range(20):
            await manager.create_agent({**SLEEP, "name": f"a{i}"})
        before = CountingStore.batches
        await asyncio.gather(*(manager.start_agent(f"a{i}") for i in range(20)))
        # 40 transitions (starting, running) for 20 agents: a handful of commits, not 40.
        assert CountingStore.batches - before <= 3
        assert all(len(store.transitions(f"a{i}")) == 2 for i in range(20))
    finally:
        await manager.stop(stop_agents=False)


async def test_store_outage_refuses_operator_changes_and_keeps_supervising() -> None:
    store, runtime = MemoryStore(), FakeRuntime()
    manager = AgentManager(store, runtime, settings())
    await manager.start(discover=False)
    try:
        await manager.create_agent(SLEEP)
        await manager.create_agent({**SLEEP, "name": "other"}, start=True)
        launches = len(runtime.launches)
        store.failure = StoreError("database is down")
        # Acknowledged means committed: the change is refused, and not made in memory either.
        with pytest.raises(Unavailable, match="database is down"):
            await manager.start_agent("sleeper")
        rec = manager.get_agent("sleeper")
        assert (rec.desired, rec.state, rec.pid) == (DesiredState.STOPPED, AgentState.STOPPED, None)
        assert len(runtime.launches) == launches
        with pytest.raises(Unavailable):
            await manager.create_agent({**SLEEP, "name": "newcomer"})
        assert [r.agent_id for r in manager.list_agents()] == ["other", "sleeper"]
        # Supervision goes on: a crash is restarted, and what it changed is kept for the store.
        first = manager.get_agent("other").pid
        runtime.crash("other", exit_code=1)
        await wait_state(manager, "other", AgentState.RUNNING)
        assert manager.get_agent("other").pid != first
        store.failure = None
        await manager._writes.flushed()  # an attempt now, as the flusher's retry would make
        assert [t.state for t in store.transitions("other")][:3] == [
            AgentState.RUNNING,
            AgentState.STARTING,
            AgentState.BACKOFF,
        ]
        stored = {r.agent_id: r for r in store.load_agents()}
        assert stored["other"].pid == manager.get_agent("other").pid
        assert stored["sleeper"].desired is DesiredState.STOPPED and "newcomer" not in stored
    finally:
        await manager.stop(stop_agents=False)


async def test_reloaded_restart_settings_apply_to_the_next_exit(parts) -> None:
    manager, _, runtime = parts
    await manager.create_agent(SLEEP, start=True)
    manager.settings = settings(restart=RestartSettings(max_restarts=0))  # what SIGHUP does
    runtime.crash("sleeper", exit_code=1)
    await asyncio.sleep(0.01)
    assert manager.get_agent("sleeper").state is AgentState.ERROR
    assert "gave up after 0 restarts" in manager.get_agent("sleeper").state_reason


async def test_nul_characters_are_refused_before_launch(parts) -> None:
    manager, _, _ = parts
    with pytest.raises(InvalidArgument) as arg:
        await manager.create_agent({"name": "x", "command": ("sleep", "1\0")})
    assert [v.field for v in arg.value.violations] == ["spec.command"]
    with pytest.raises(InvalidArgument) as env:
        await manager.create_agent({**SLEEP, "environment": {"A": "b\0c"}})
    assert [v.field for v in env.value.violations] == ["spec.environment"]


def test_an_unreadable_agents_directory_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opmasd.manager.packages.scan import scan

    blocked, good = tmp_path / "blocked", tmp_path / "good"
    blocked.mkdir()
    write_manifest(good / "a", "name: a\nentrypoint: sleep 100\n")
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self == blocked:  # root reads any directory: fake the EACCES an operator would get
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    result = scan([blocked, good])
    assert [m.agent_id for m in result.manifests] == ["a"]
    assert [(e.path, e.message) for e in result.errors] == [
        (blocked, "cannot read the agents directory: Permission denied")
    ]
