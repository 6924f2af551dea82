"""NatsBus against a real nats-server: intake, commands, malformed input, reconnection, discovery."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from opmasd.bus import codec
from opmasd.bus.connection import NatsBus
from opmasd.bus.embedded import EmbeddedNatsServer
from opmasd.bus.micro import ServiceDescription, ServiceEndpoint
from opmasd.bus.registration import server_has_seen
from opmasd.bus.subjects import Subjects
from opmasd.core.clock import rfc3339
from opmasd.core.errors import BusTimeout, BusUnavailable
from opmasd.core.messages import Heartbeat, MetricsReport

MACHINE_NATS = "nats://127.0.0.1:4222"


class Intake:
    """What the bus delivers, as queues a test can wait on."""

    def __init__(self) -> None:
        self.heartbeats: asyncio.Queue[Heartbeat] = asyncio.Queue()
        self.metrics: asyncio.Queue[MetricsReport] = asyncio.Queue()

    def attach(self, bus: NatsBus) -> None:
        bus.set_handlers(self.heartbeats.put_nowait, self.metrics.put_nowait)

    async def next_heartbeat(self, timeout: float = 5.0) -> Heartbeat:
        return await asyncio.wait_for(self.heartbeats.get(), timeout)


def hb(agent_id: str = "a1", **extra: Any) -> bytes:
    return json.dumps({"agent_id": agent_id, "status": "running", **extra}).encode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path / "nats", authorization=False)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def bus(server: EmbeddedNatsServer) -> AsyncIterator[NatsBus]:
    b = await NatsBus.connect(server.url, subjects=Subjects("t"))
    assert b.is_connected
    yield b
    await b.close()


@pytest.fixture
async def agent(server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    """A plain nats-py client playing an agent (or any other service)."""
    nc = await nats.connect(server.url)
    yield nc
    await nc.close()


async def test_heartbeats_and_metrics_are_decoded_and_delivered(bus: NatsBus, agent: Client) -> None:
    intake = Intake()
    intake.attach(bus)
    await agent.publish("t.status", hb(timestamp="2026-11-24T07:54:47.123Z", metadata={"v": "1"}))
    await agent.publish("t.metrics", json.dumps({"agent_id": "a1", "metrics": {"events": 12}}).encode())
    got = await intake.next_heartbeat()
    assert (got.agent_id, got.status, dict(got.metadata)) == ("a1", "running", {"v": "1"})
    assert rfc3339(got.timestamp) == "2026-11-24T07:54:47.123Z"
    report = await asyncio.wait_for(intake.metrics.get(), 5)
    assert report.agent_id == "a1" and report.metrics == {"events": 12}
    assert bus.stats().messages_in == {"t.status": 1, "t.metrics": 1}
    assert bus.agent_url == bus.agent_url.strip() and bus.agent_url.startswith("nats://127.0.0.1:")


async def test_malformed_barrage_is_counted_bounded_and_harmless(bus: NatsBus, agent: Client) -> None:
    intake = Intake()
    intake.attach(bus)
    barrage = [
        b"not json at all",
        b"\x00\xff" * 10,
        b"[]",
        json.dumps({"status": "running"}).encode(),  # agent_id missing
        json.dumps({"agent_id": 5, "status": "running"}).encode(),  # wrong type
        json.dumps({"agent_id": "a1", "status": "x", "timestamp": "yesterday"}).encode(),
        b"\x07" * 1_000_000,  # 1 MB of garbage: refused before parsing
    ]
    with capture_logs() as logs:
        for payload in barrage:
            await agent.publish("t.status", payload)
        for i in range(1000):
            await agent.publish("t.status", b"{broken %d" % i)
        await agent.publish("t.metrics", b'{"agent_id": "a1", "metrics": "lots"}')
        await agent.publish("t.status", hb("survivor"))
        # One publisher, one subscription: in order, so everything before it was handled.
        assert (await intake.next_heartbeat()).agent_id == "survivor"
        await agent.publish("t.metrics", json.dumps({"agent_id": "a1", "metrics": {}}).encode())
        assert (await asyncio.wait_for(intake.metrics.get(), 5)).agent_id == "a1"
    assert bus.malformed_counts() == {"t.status": len(barrage) + 1000, "t.metrics": 1}
    assert intake.heartbeats.empty()
    malformed_logs = [e for e in logs if e["event"].startswith("malformed message")]
    assert [e["key"] for e in malformed_logs] == ["t.status", "t.metrics"]  # one per burst
    assert len(logs) < 10
    assert bus.is_connected


async def test_handler_errors_are_logged_and_do_not_stop_the_intake(bus: NatsBus, agent: Client) -> None:
    intake = Intake()

    def failing(heartbeat: Heartbeat) -> None:
        if heartbeat.agent_id == "bad":
            raise RuntimeError("handler bug")
        intake.heartbeats.put_nowait(heartbeat)

    bus.set_handlers(failing, intake.metrics.put_nowait)
    with capture_logs() as logs:
        await agent.publish("t.status", hb("bad"))
        await agent.publish("t.status", hb("good"))
        assert (await intake.next_heartbeat()).agent_id == "good"
    assert bus.stats().handler_errors == 1
    assert any(e["event"] == "bus message handler failed" for e in logs)


async def test_command_agent_round_trip(bus: NatsBus, agent: Client) -> None:
    seen: list[dict[str, Any]] = []

    async def respond(msg: Msg) -> None:
        request = json.loads(msg.data)
        seen.append(request)
        await msg.respond(
            codec.encode_response("success", request["command"], "a1", {"echo": request["params"]})
        )

    await agent.subscribe("t.a1.command", cb=respond)
    await server_has_seen(agent)
    reply = await bus.command_agent("a1", "ping", {"n": 1}, timeout=2)
    assert (reply.status, reply.result, reply.error) == ("success", {"echo": {"n": 1}}, "")
    assert seen[0]["command"] == "ping" and seen[0]["agent_id"] == "a1" and seen[0]["params"] == {"n": 1}
    assert seen[0]["timestamp"].endswith("Z")


async def test_command_timeout_no_responders_and_malformed_reply(bus: NatsBus, agent: Client) -> None:
    async def silent(msg: Msg) -> None:
        pass

    async def garbage(msg: Msg) -> None:
        await msg.respond(b'{"status": "maybe"}')

    await agent.subscribe("t.mute.command", cb=silent)
    await agent.subscribe("t.broken.command", cb=garbage)
    await server_has_seen(agent)
    started = time.monotonic()
    with pytest.raises(BusTimeout, match="did not answer"):
        await bus.command_agent("mute", "ping", {}, timeout=0.2)
    with pytest.raises(BusTimeout, match="not listening"):
        await bus.command_agent("nobody", "ping", {}, timeout=5)
    assert time.monotonic() - started < 2
    reply = await bus.command_agent("broken", "ping", {}, timeout=2)
    assert reply.status == "error" and reply.error.startswith("malformed reply: status:")


async def test_requests_are_served_concurrently(bus: NatsBus, agent: Client) -> None:
    async def handler(data: bytes) -> bytes:
        if data == b"slow":
            await asyncio.sleep(1.0)
        return data.upper()

    served = await bus.serve("t.svc", handler, queue="q")
    await server_has_seen(agent)
    slow = asyncio.ensure_future(agent.request("t.svc", b"slow", timeout=5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert (await agent.request("t.svc", b"fast", timeout=5)).data == b"FAST"
    assert time.monotonic() - started < 0.5  # not stuck behind the slow one
    assert (await slow).data == b"SLOW"
    await served.stop()
    with pytest.raises(nats.errors.NoRespondersError):
        await agent.request("t.svc", b"x", timeout=1)


async def test_reconnects_by_itself_to_a_server_back_on_the_same_port(
    tmp_path: Path, server: EmbeddedNatsServer, bus: NatsBus
) -> None:
    intake = Intake()
    intake.attach(bus)
    url = server.url
    await server.stop()
    for _ in range(100):
        if not bus.is_connected:
            break
        await asyncio.sleep(0.02)
    assert not bus.is_connected
    with pytest.raises(BusUnavailable):
        await bus.command_agent("a1", "ping", {}, timeout=1)
    again = EmbeddedNatsServer(tmp_path / "nats", port=int(url.rsplit(":", 1)[1]), authorization=False)
    try:
        assert await again.start() == url
        # nats-py reports the reconnect (its callback) a moment after the connection is up.
        for _ in range(500):
            if bus.is_connected and bus.stats().reconnects:
                break
            await asyncio.sleep(0.02)
        assert bus.is_connected and bus.stats().reconnects == 1
        nc = await nats.connect(url)
        try:
            await nc.publish("t.status", hb("after"))
            assert (await intake.next_heartbeat()).agent_id == "after"
        finally:
            await nc.close()
    finally:
        await bus.close()
        await again.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_starts_with_the_server_down_and_connects_when_it_comes_up(tmp_path: Path) -> None:
    port = free_port()
    bus = await NatsBus.connect(f"nats://127.0.0.1:{port}", subjects=Subjects("t"), initial_wait=0.1)
    try:
        assert not bus.is_connected
        with pytest.raises(BusUnavailable):
            await bus.command_agent("a1", "ping", {}, timeout=1)
        with pytest.raises(BusUnavailable):
            await bus.publish("t.x", b"")

        async def echo(data: bytes) -> bytes:
            return data

        await bus.serve("t.echo", echo)  # registered now, subscribed once connected
        intake = Intake()
        intake.attach(bus)
        server = EmbeddedNatsServer(tmp_path, port=port, authorization=False)
        await server.start()
        try:
            assert await bus.wait_connected(10)
            nc = await nats.connect(server.url)
            try:
                assert (await nc.request("t.echo", b"hi", timeout=2)).data == b"hi"
                await nc.publish("t.status", hb())
                assert (await intake.next_heartbeat()).agent_id == "a1"
            finally:
                await nc.close()
        finally:
            await bus.close()
            await server.stop()
    finally:
        await bus.close()


async def test_close_while_never_connected_returns_promptly() -> None:
    bus = await NatsBus.connect(f"nats://127.0.0.1:{free_port()}", initial_wait=0.05)
    started = time.monotonic()
    await bus.close()
    assert time.monotonic() - started < 2 and not bus.is_connected


async def test_micro_discovery_answers_ping_info_stats(bus: NatsBus, agent: Client) -> None:
    seen: list[str] = []

    async def handler(data: bytes, authorization: str) -> bytes:
        seen.append(authorization)
        return b"ok"

    service = await bus.add_service(
        ServiceDescription("testsvc", "1.2.3", "a test", {"node": "n1"}),
        [ServiceEndpoint("work", "t.work", handler)],
    )
    assert (await agent.request("t.work", b"", timeout=2)).data == b"ok"
    # The request's Authorization header reaches the handler (bounded), any case of its name.
    await agent.request("t.work", b"", timeout=2, headers={"authorization": "Bearer x" * 1000})
    assert seen == ["", ("Bearer x" * 1000)[:1024]]
    ping = json.loads((await agent.request("$SRV.PING.testsvc", b"", timeout=2)).data)
    assert (ping["name"], ping["version"], ping["metadata"]) == ("testsvc", "1.2.3", {"node": "n1"})
    info = json.loads((await agent.request("$SRV.INFO.testsvc", b"", timeout=2)).data)
    assert [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]] == [
        ("work", "t.work", "opmasd")
    ]
    stats = json.loads((await agent.request("$SRV.STATS.testsvc", b"", timeout=2)).data)
    assert stats["endpoints"][0]["num_requests"] == 2
    assert stats["endpoints"][0]["data"]["handled"] == 2
    await service.stop()
    with pytest.raises(nats.errors.NoRespondersError):
        await agent.request("$SRV.PING.testsvc", b"", timeout=1)


async def test_against_the_machines_nats_server() -> None:
    """DESIGN §9: the machine's own nats-server (Debian's 2.9 where installed) too."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 4222), 2)
    except (OSError, TimeoutError) as exc:
        pytest.fail(
            f"no NATS server at {MACHINE_NATS} ({exc}); start the machine's nats-server "
            "(.ci/run does), this test must run against it"
        )
    writer.close()
    prefix = f"test{uuid.uuid4().hex[:12]}"  # other users of that server never see our messages
    bus = await NatsBus.connect(MACHINE_NATS, subjects=Subjects(prefix))
    agent = await nats.connect(MACHINE_NATS)
    try:
        assert bus.is_connected
        intake = Intake()
        intake.attach(bus)

        async def respond(msg: Msg) -> None:
            await msg.respond(codec.encode_response("success", "ping", "a1", "pong"))

        await agent.subscribe(f"{prefix}.a1.command", cb=respond)
        await server_has_seen(agent)
        await agent.publish(f"{prefix}.status", b"garbage")
        await agent.publish(f"{prefix}.status", hb())
        assert (await intake.next_heartbeat()).agent_id == "a1"
        assert bus.malformed_counts() == {f"{prefix}.status": 1}
        assert (await bus.command_agent("a1", "ping", {}, timeout=2)).result == "pong"
        with pytest.raises(BusTimeout):
            await bus.command_agent("a2", "ping", {}, timeout=0.5)
    finally:
        await agent.close()
        await bus.close()


async def test_close_with_the_server_gone_returns_promptly(server: EmbeddedNatsServer) -> None:
    bus = await NatsBus.connect(server.url, subjects=Subjects("t"))

    async def handler(data: bytes) -> bytes:
        return data

    async def endpoint(data: bytes, authorization: str) -> bytes:
        return data

    await bus.serve("t.a", handler)
    await bus.add_service(ServiceDescription("gone", "1.0.0"), [ServiceEndpoint("b", "t.b", endpoint)])
    await server.stop()
    started = time.monotonic()
    await bus.close()
    assert time.monotonic() - started < 5
