"""The Prometheus metrics: the manager's numbers at scrape time, and RPCs counted by the interceptor.

The exposition is read back with prometheus_client's own parser, as a scraper would. RPCs go
through a real grpc.aio server on a unix socket: a test service with all four handler kinds,
and the daemon's own GrpcServer (AgentService, health, reflection).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from opmas.v1 import agents_pb2 as pb
from opmas.v1.agents_pb2_grpc import AgentServiceStub
from opmasd.api.grpc_server import GrpcListeners, GrpcServer
from opmasd.api.metrics import DaemonMetrics
from opmasd.api.rpc_metrics import RpcMetricsInterceptor
from opmasd.core.errors import StoreError
from opmasd.core.model import AgentState, RestartPolicy
from opmasd.manager import AgentManager, HealthSettings, ManagerSettings, RestartSettings
from opmasd.manager.stats import DurationHistogram
from opmasd.testing.fake_bus import FakeBus
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

# No start window: these tests are about what happens after a start (test_state_rules has it).
SLEEP = {"name": "sleeper", "command": ("sleep", "1000"), "start_seconds": 0.0}
RUNNING = AgentState.RUNNING
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: DaemonMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def sock() -> Iterator[Path]:
    # A short directory: a unix socket's path must fit in 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="opmas-") as directory:
        yield Path(directory) / "grpc.sock"


@pytest.fixture
async def parts() -> AsyncIterator[tuple[AgentManager, MemoryStore, FakeRuntime, FakeBus]]:
    store, runtime, bus = MemoryStore(), FakeRuntime(), FakeBus()
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


async def wait_state(manager: AgentManager, agent_id: str, state: AgentState) -> None:
    async with asyncio.timeout(3):
        while manager.get_agent(agent_id).state is not state:
            await asyncio.sleep(0.01)


# -- the manager's numbers ----------------------------------------------------------------------


async def test_agents_restarts_and_heartbeats_are_read_at_scrape(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, runtime, bus = parts
    metrics = DaemonMetrics(manager, lambda: bus.is_connected)
    await manager.create_agent({**SLEEP, "name": "idle"})
    await manager.create_agent(
        {**SLEEP, "name": "crashy", "restart_policy": RestartPolicy.ALWAYS}, start=True
    )
    await manager.create_agent({**SLEEP, "name": "quiet"}, start=True)
    await manager.create_agent({**SLEEP, "name": "lazy", "restart_on_inactive": True}, start=True)
    runtime.crash("crashy", exit_code=1)
    await wait_state(manager, "crashy", AgentState.RUNNING)
    for _ in range(3):
        bus.heartbeat("quiet")
    bus.heartbeat("lazy")
    bus.heartbeat("ghost")  # nobody we know
    await wait_state(manager, "quiet", AgentState.INACTIVE)
    async with asyncio.timeout(3):  # lazy is marked inactive too, then restarted by policy
        while (
            manager.stats().restarts_after_inactive < 1
            or manager.get_agent("lazy").state is not AgentState.RUNNING
        ):
            await asyncio.sleep(0.01)

    samples = scrape(metrics)
    assert value(samples, "opmas_agents", state="stopped") == 1
    assert value(samples, "opmas_agents", state="running") == 2  # crashy, lazy
    assert value(samples, "opmas_agents", state="inactive") == 1  # quiet
    assert value(samples, "opmas_agents", state="backoff") == 0  # every state is present
    assert value(samples, "opmas_agent_restarts_total", cause="exit") == 1
    assert value(samples, "opmas_agent_restarts_total", cause="inactive") == 1
    assert value(samples, "opmas_agent_restart_count", state="running") == 2
    assert value(samples, "opmas_heartbeats_received_total") == 5
    assert value(samples, "opmas_heartbeats_unknown_total") == 1
    assert value(samples, "opmas_heartbeats_late_total") == 2
    assert value(samples, "opmas_nats_connected") == 1
    bus.connected = False
    assert value(scrape(metrics), "opmas_nats_connected") == 0


async def test_process_metrics_are_on_the_daemons_own_registry(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, _, bus = parts
    samples = scrape(DaemonMetrics(manager, lambda: bus.is_connected))
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    assert ("process_cpu_seconds_total", ()) in samples
    # Two daemons' metrics in one process do not share a registry (nor use the global one).
    other = DaemonMetrics(manager, lambda: bus.is_connected)
    other.observe_rpc("m", "OK", "grpc", 0.1)
    assert (
        "opmas_rpc_requests_total",
        (("code", "OK"), ("method", "m"), ("transport", "grpc")),
    ) not in samples


async def test_store_outage_shows_as_failing_with_pending_writes_then_catches_up() -> None:
    # No bus and no monitor pass: every heartbeat flush here is the test's own.
    store, runtime = MemoryStore(), FakeRuntime()
    manager = AgentManager(store, runtime, ManagerSettings(node="n1", monitoring_interval=60))
    metrics = DaemonMetrics(manager, lambda: True)
    await manager.start(discover=False)
    try:
        await manager.create_agent(SLEEP, start=True)
        seen = manager.get_agent("sleeper").updated_at
        manager._writes.note_heartbeat("sleeper", seen)
        await manager._writes.flush_heartbeats()
        row_flushes = value(scrape(metrics), "opmas_store_flush_duration_seconds_count", kind="rows")
        store.failure = StoreError("database is down")
        runtime.crash("sleeper", exit_code=0)  # observed while the store is down: kept for later
        with pytest.raises(StoreError, match="database is down"):
            await manager._writes.flushed("sleeper")
        manager._writes.note_heartbeat("sleeper", seen)
        await manager._writes.flush_heartbeats()

        samples = scrape(metrics)
        assert value(samples, "opmas_store_failing") == 1
        assert value(samples, "opmas_store_pending_writes", kind="rows") == 2  # the row, a transition
        assert value(samples, "opmas_store_pending_writes", kind="heartbeats") == 1
        assert value(samples, "opmas_store_write_failures_total") == 2  # a row flush, a heartbeat flush
        assert value(samples, "opmas_store_flush_duration_seconds_count", kind="rows") == row_flushes + 1

        store.failure = None
        await manager._writes.flushed()
        await manager._writes.flush_heartbeats()
        samples = scrape(metrics)
        assert value(samples, "opmas_store_failing") == 0
        assert value(samples, "opmas_store_pending_writes", kind="rows") == 0
        assert value(samples, "opmas_store_pending_writes", kind="heartbeats") == 0
        assert value(samples, "opmas_store_flush_duration_seconds_count", kind="rows") == row_flushes + 2
        assert value(samples, "opmas_store_flush_duration_seconds_count", kind="heartbeats") == 3
        assert value(samples, "opmas_store_flush_duration_seconds_sum", kind="rows") > 0
        inf = value(samples, "opmas_store_flush_duration_seconds_bucket", kind="rows", le="+Inf")
        assert inf == row_flushes + 2
        assert store.load_agents()[0].state is AgentState.STOPPED
    finally:
        await manager.stop(stop_agents=False)


def test_flush_durations_fall_in_the_bucket_whose_bound_they_do_not_exceed() -> None:
    histogram = DurationHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.5):
        histogram.observe(seconds)
    snapshot = histogram.snapshot()
    assert snapshot.counts == (2, 1, 1) and snapshot.count == 4
    assert snapshot.total == pytest.approx(0.5035)


# -- RPCs through the interceptor, all four handler kinds ----------------------------------------


async def _answer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"boom":
        raise ValueError("unexpected")
    if request == b"slow":
        await asyncio.sleep(10)
    return request


async def unary_unary(request: bytes, context: Any) -> bytes:
    return await _answer(request, context)


async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    yield await _answer(request, context)


async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
    last = b""
    async for request in requests:
        last = await _answer(request, context)
    return last


async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield await _answer(request, context)


ECHO = grpc.method_handlers_generic_handler(
    "test.Echo",
    {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    },
)


@pytest.fixture
async def echo(sock: Path) -> AsyncIterator[tuple[grpc.aio.Channel, list[tuple[str, str, str, float]]]]:
    recorded: list[tuple[str, str, str, float]] = []
    server = grpc.aio.server(interceptors=[RpcMetricsInterceptor(lambda *call: recorded.append(call))])
    server.add_generic_rpc_handlers((ECHO,))
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        yield channel, recorded
    await server.stop(0)


async def call(channel: Any, kind: str, request: bytes, **kw: Any) -> str:
    """Make one call of the kind; returns the code the client saw. (Untyped channel: the stubs
    type a multicallable made without serializers as taking Never.)"""
    method = f"/test.Echo/{kind}"
    try:
        if kind == "UnaryUnary":
            await channel.unary_unary(method)(request, **kw)
        elif kind == "UnaryStream":
            async for _ in channel.unary_stream(method)(request, **kw):
                pass
        elif kind == "StreamUnary":
            await channel.stream_unary(method)(iter([b"ok", request]), **kw)
        else:
            async for _ in channel.stream_stream(method)(iter([b"ok", request]), **kw):
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


KINDS = ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"]


@pytest.mark.parametrize("kind", KINDS)
async def test_every_handler_kind_is_recorded_with_the_code_the_client_got(echo, kind: str) -> None:  # type: ignore[no-untyped-def]
    channel, recorded = echo
    seen = [await call(channel, kind, request) for request in (b"ok", b"missing", b"boom")]
    seen.append(await call(channel, kind, b"slow", timeout=0.2))
    assert seen == ["OK", "NOT_FOUND", "UNKNOWN", "DEADLINE_EXCEEDED"]
    async with asyncio.timeout(2):  # the server's side of the deadline ends a moment later
        while len(recorded) < 4:
            await asyncio.sleep(0.01)
    method = f"test.Echo/{kind}"
    # A call cut off by its deadline has its task cancelled: the server counts it CANCELLED.
    assert [(m, code, transport) for m, code, transport, _ in recorded] == [
        (method, code, "grpc") for code in ("OK", "NOT_FOUND", "UNKNOWN", "CANCELLED")
    ]
    assert recorded[-1][3] >= 0.15  # the slow call's time is its whole life


async def test_a_client_that_cancels_a_stream_is_recorded_as_cancelled(echo) -> None:  # type: ignore[no-untyped-def]
    channel, recorded = echo
    stream = channel.unary_stream("/test.Echo/UnaryStream")(b"slow")
    assert await stream.read() == b"first"
    stream.cancel()
    async with asyncio.timeout(2):
        while not recorded:
            await asyncio.sleep(0.01)
    assert recorded[0][:3] == ("test.Echo/UnaryStream", "CANCELLED", "grpc")


async def test_the_transport_comes_from_the_gateways_metadata(echo) -> None:  # type: ignore[no-untyped-def]
    channel, recorded = echo
    rest = (("x-opmas-transport", "rest"),)
    assert await call(channel, "UnaryUnary", b"ok", metadata=rest) == "OK"
    assert await call(channel, "UnaryUnary", b"ok") == "OK"
    assert (
        await call(channel, "UnaryUnary", b"ok", metadata=(("x-opmas-transport", "carrier-pigeon"),)) == "OK"
    )
    assert await call(channel, "UnaryStream", b"missing", metadata=rest) == "NOT_FOUND"
    assert [(m, code, transport) for m, code, transport, _ in recorded] == [
        ("test.Echo/UnaryUnary", "OK", "rest"),
        ("test.Echo/UnaryUnary", "OK", "grpc"),
        ("test.Echo/UnaryUnary", "OK", "grpc"),  # only two transports exist
        ("test.Echo/UnaryStream", "NOT_FOUND", "rest"),
    ]


async def test_an_unknown_method_is_not_recorded(echo) -> None:  # type: ignore[no-untyped-def]
    channel, recorded = echo
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary("/test.Echo/NoSuchMethod")(b"ok")
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert recorded == []


# -- the daemon's own server, into the exposition ------------------------------------------------


async def test_the_daemons_rpcs_are_exposed_by_method_code_and_transport(parts, sock: Path) -> None:  # type: ignore[no-untyped-def]
    manager, _, runtime, bus = parts
    metrics = DaemonMetrics(manager, lambda: bus.is_connected)
    server = GrpcServer(manager, GrpcListeners(socket_path=sock), interceptors=[metrics.interceptor])
    await server.start()
    await manager.create_agent(SLEEP)
    runtime.logs["sleeper"] = ["one", "two"]
    rest = (("x-opmas-transport", "rest"),)
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            agents = AgentServiceStub(channel)
            await agents.ListAgents(pb.ListAgentsRequest())
            await agents.ListAgents(pb.ListAgentsRequest(), metadata=rest)
            with pytest.raises(grpc.aio.AioRpcError):
                await agents.GetAgent(pb.GetAgentRequest(agent_id="nobody"), metadata=rest)
            lines = [m.line async for m in agents.GetAgentLogs(pb.GetAgentLogsRequest(agent_id="sleeper"))]
            assert lines == ["one", "two"]
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in agents.GetAgentLogs(pb.GetAgentLogsRequest(agent_id="nobody")):
                    pass
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for _ in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                pass
    finally:
        await server.stop(0)

    samples = scrape(metrics)
    service = "opmas.v1.AgentService"

    def count(method: str, code: str, transport: str = "grpc") -> float:
        return value(samples, "opmas_rpc_requests_total", method=method, code=code, transport=transport)

    assert count(f"{service}/ListAgents", "OK") == 1
    assert count(f"{service}/ListAgents", "OK", "rest") == 1
    assert count(f"{service}/GetAgent", "NOT_FOUND", "rest") == 1
    assert count(f"{service}/GetAgentLogs", "OK") == 1
    assert count(f"{service}/GetAgentLogs", "NOT_FOUND") == 1
    assert count("grpc.health.v1.Health/Check", "OK") == 1
    assert count("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "OK") == 1
    labels = {"method": f"{service}/GetAgent", "code": "NOT_FOUND", "transport": "rest"}
    assert value(samples, "opmas_rpc_duration_seconds_count", **labels) == 1
    assert value(samples, "opmas_rpc_duration_seconds_bucket", **labels, le="+Inf") == 1
    assert value(samples, "opmas_rpc_duration_seconds_sum", **labels) > 0


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(parts) -> None:  # type: ignore[no-untyped-def]
    manager, _, _, bus = parts
    body, content_type = DaemonMetrics(manager, lambda: bus.is_connected).render(
        "application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
