"""Each agent runs on the runtime its spec names (manager.runtimes): one this daemon has no
backend for is refused, at registration, update and start, never run by another; a limit the
backend cannot enforce is refused naming the field; a process keeps the backend that launched
or adopted it, even after its spec changes."""

from __future__ import annotations

import pytest

from opmasd.core.errors import InvalidArgument
from opmasd.core.model import AgentState, RuntimeKind
from opmasd.manager import AgentManager, ManagerSettings, RestartSettings
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

FAST = RestartSettings(backoff_initial=0.01, backoff_max=0.05, stable_after=10.0, max_restarts=3)
SETTINGS = ManagerSettings(node="n1", restart=FAST, monitoring_interval=60.0)
SLEEP = {"name": "sleeper", "command": ("sleep", "1000"), "start_seconds": 0.0}


async def test_a_runtime_without_a_backend_is_refused_and_nothing_is_stored() -> None:
    process = FakeRuntime()
    manager = AgentManager(
        MemoryStore(), process, SETTINGS, unavailable_runtimes={RuntimeKind.SYSTEMD: "no system bus"}
    )
    await manager.start(discover=False)
    try:
        with pytest.raises(InvalidArgument) as caught:
            await manager.create_agent({**SLEEP, "runtime": RuntimeKind.SYSTEMD})
        assert caught.value.violations[0].field == "spec.runtime"
        assert caught.value.message == "spec.runtime: the systemd runtime is not available: no system bus"
        assert manager.list_agents() == []
        await manager.create_agent(SLEEP)
        with pytest.raises(InvalidArgument, match="the systemd runtime is not available"):
            await manager.update_agent("sleeper", {"runtime": RuntimeKind.SYSTEMD})
        assert manager.get_agent("sleeper").spec.runtime is RuntimeKind.PROCESS  # unchanged
    finally:
        await manager.stop(stop_agents=False)


async def test_a_limit_the_backend_cannot_enforce_is_refused_naming_it() -> None:
    process = FakeRuntime()
    process.unenforceable["resources.memory_max_bytes"] = "no memory controller here"
    manager = AgentManager(MemoryStore(), process, SETTINGS)
    await manager.start(discover=False)
    try:
        spec = {**SLEEP, "resources": {"memory_max_bytes": 64 << 20}}
        with pytest.raises(InvalidArgument) as caught:
            await manager.create_agent(spec)
        assert caught.value.message == "spec.resources.memory_max_bytes: no memory controller here"
        await manager.create_agent({**SLEEP, "resources": {"open_files_max": 64}})  # enforced: fine
    finally:
        await manager.stop(stop_agents=False)


async def test_each_agent_is_launched_by_its_runtime_and_keeps_it_until_it_stops() -> None:
    process, systemd = FakeRuntime(first_pid=1000), FakeRuntime(first_pid=5000)
    backends = {RuntimeKind.PROCESS: process, RuntimeKind.SYSTEMD: systemd}
    manager = AgentManager(MemoryStore(), backends, SETTINGS)
    await manager.start(discover=False)
    try:
        await manager.create_agent({**SLEEP, "name": "unit", "runtime": RuntimeKind.SYSTEMD}, start=True)
        await manager.create_agent({**SLEEP, "name": "child"}, start=True)
        assert [r.agent_id for r in systemd.launches] == ["unit"]
        assert [r.agent_id for r in process.launches] == ["child"]
        # A spec changed while the process runs applies at the next start: the stop goes to
        # the backend that launched it.
        await manager.update_agent("unit", {"runtime": RuntimeKind.PROCESS})
        await manager.stop_agent("unit")
        assert [agent for agent, _ in systemd.terminations] == ["unit"] and process.terminations == []
        await manager.start_agent("unit")
        assert [r.agent_id for r in process.launches] == ["child", "unit"]
    finally:
        await manager.stop(stop_agents=False)


async def test_a_restarted_daemon_adopts_from_whichever_backend_still_runs_the_process() -> None:
    store = MemoryStore()
    process, systemd = FakeRuntime(), FakeRuntime(first_pid=5000)
    first = AgentManager(store, {RuntimeKind.PROCESS: process, RuntimeKind.SYSTEMD: systemd}, SETTINGS)
    await first.start(discover=False)
    await first.create_agent({**SLEEP, "name": "unit", "runtime": RuntimeKind.SYSTEMD}, start=True)
    pid = first.get_agent("unit").pid
    await first.stop(stop_agents=False)

    process2, systemd2 = FakeRuntime(), FakeRuntime()
    systemd2.alive_elsewhere[pid] = 1_700_000_000.0  # the unit outlived the daemon
    second = AgentManager(store, {RuntimeKind.PROCESS: process2, RuntimeKind.SYSTEMD: systemd2}, SETTINGS)
    await second.start(discover=False)
    try:
        rec = second.get_agent("unit")
        assert rec.state is AgentState.RUNNING and rec.pid == pid
        assert process2.launches == [] and systemd2.launches == []
    finally:
        await second.stop(stop_agents=False)
