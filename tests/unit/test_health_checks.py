"""Liveness and readiness (api.health): the checks, their reasons, and the gRPC health status kept in step."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opmasd.api.grpc_server import SERVICE_NAME, GrpcListeners, GrpcServer
from opmasd.api.health import DaemonHealth
from opmasd.core.clock import utcnow
from opmasd.core.errors import StoreError, Unavailable
from opmasd.manager import AgentManager, ManagerSettings
from opmasd.testing.fake_bus import FakeBus
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FakeServer:
    """What readiness sees of the gRPC server; remembers every status it was given."""

    def __init__(self) -> None:
        self.serving = True
        self.statuses: list[bool] = []

    async def set_serving(self, serving: bool) -> None:
        self.statuses.append(serving)


@pytest.fixture
async def parts() -> AsyncIterator[tuple[AgentManager, MemoryStore, FakeBus]]:
    store, bus = MemoryStore(), FakeBus()
    manager = AgentManager(store, FakeRuntime(), ManagerSettings(node="n1", monitoring_interval=60), bus=bus)
    await manager.start(discover=False)
    yield manager, store, bus
    await manager.stop(stop_agents=False)


@pytest.fixture
def sock() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="opmas-") as directory:
        yield Path(directory) / "grpc.sock"


async def test_ready_when_store_bus_and_grpc_are_all_up(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, bus = parts
    health = DaemonHealth(manager, lambda: bus.is_connected, FakeServer())
    assert health.alive()
    assert health.ready() == (True, {"store": "ok", "bus": "ok", "grpc": "ok"})


async def test_each_check_that_fails_says_why(parts) -> None:  # type: ignore[no-untyped-def]
    manager, store, bus = parts
    server = FakeServer()
    health = DaemonHealth(manager, lambda: bus.is_connected, server)
    bus.connected = False
    ready, checks = health.ready()
    assert not ready and checks == {"store": "ok", "bus": "not connected to NATS", "grpc": "ok"}
    bus.connected, server.serving = True, False
    assert health.ready() == (False, {"store": "ok", "bus": "ok", "grpc": "the gRPC server is not serving"})
    server.serving = True
    await manager.create_agent({"name": "sleeper", "command": ("sleep", "1")})
    store.failure = StoreError("database is down")
    with pytest.raises(Unavailable):
        await manager.update_agent("sleeper", {"description": "changed"})
    ready, checks = health.ready()
    assert not ready and checks["bus"] == checks["grpc"] == "ok"
    assert checks["store"].startswith("store writes are failing (1 rows")  # the row, undone
    assert health.alive()  # a broken dependency is not a reason to restart the daemon
    store.failure = None
    await manager._writes.flushed()  # the flusher's retry
    assert health.ready()[0]


async def test_a_failed_heartbeat_flush_makes_the_store_check_fail_until_one_succeeds(parts) -> None:  # type: ignore[no-untyped-def]
    manager, store, bus = parts
    health = DaemonHealth(manager, lambda: bus.is_connected, FakeServer())
    await manager.create_agent({"name": "a1", "command": ("sleep", "1")})
    store.failure = StoreError("database is down")
    seen = utcnow()
    manager._writes.note_heartbeat("a1", seen)
    await manager._writes.flush_heartbeats()
    assert health.ready()[1]["store"] != "ok"
    store.failure = None
    await manager._writes.flush_heartbeats()
    assert health.ready()[1]["store"] == "ok"
    # Kept through the failure, and written by the next flush.
    assert store.load_agents()[0].last_heartbeat == seen


async def test_the_grpc_status_is_set_when_readiness_changes_and_only_then(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, bus = parts
    server = FakeServer()
    health = DaemonHealth(manager, lambda: bus.is_connected, server, interval=0.01)
    await health.start()
    try:
        assert server.statuses == [True]  # published at start
        bus.connected = False
        async with asyncio.timeout(2):
            while server.statuses[-1]:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # several checks, no change: nothing more is published
        assert server.statuses == [True, False]
        bus.connected = True
        async with asyncio.timeout(2):
            while not server.statuses[-1]:
                await asyncio.sleep(0.01)
        assert server.statuses == [True, False, True]
    finally:
        await health.stop()


async def test_agent_service_health_follows_readiness_on_a_real_server(parts, sock: Path) -> None:  # type: ignore[no-untyped-def]
    manager, _, bus = parts
    server = GrpcServer(manager, GrpcListeners(socket_path=sock))
    assert not server.serving
    await server.start()
    assert server.serving
    health = DaemonHealth(manager, lambda: bus.is_connected, server, interval=0.01)
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                return int(reply.status)

            async def wait_status(expected: int) -> None:
                async with asyncio.timeout(2):
                    while await status(SERVICE_NAME) != expected:
                        await asyncio.sleep(0.01)

            bus.connected = False  # down before the first check: published NOT_SERVING at start
            await health.start()
            assert await status(SERVICE_NAME) == NOT_SERVING
            assert await status("") == SERVING  # the process answers: that is liveness
            bus.connected = True
            await wait_status(SERVING)
            bus.connected = False
            await wait_status(NOT_SERVING)
            bus.connected = True
            await wait_status(SERVING)
            stopping = asyncio.ensure_future(server.stop(1.0))
            await asyncio.sleep(0.05)
            assert not server.serving and not health.ready()[0]
            await stopping
    finally:
        await health.stop()
        await server.stop(0)
