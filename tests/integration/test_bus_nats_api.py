"""The manager's NATS API end to end: a real nats-server, a real AgentManager (in-memory parts)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs

import opmasd
from opmasd.api.auth import Gate
from opmasd.api.nats_api import NatsManagerApi
from opmasd.bus import codec
from opmasd.bus.connection import NatsBus
from opmasd.bus.embedded import EmbeddedNatsServer
from opmasd.bus.manager_service import ManagerService
from opmasd.bus.registration import server_has_seen
from opmasd.bus.subjects import Subjects
from opmasd.core.auth import ApiToken, Role
from opmasd.core.model import AgentRecord, AgentSpec
from opmasd.manager import AgentManager, ManagerSettings
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

SLEEP = {"name": "sleeper", "type": "collector", "command": ("sleep", "100")}


def _token(role: Role) -> ApiToken:
    return ApiToken(f"{role.value:016x}", role, "test", "", datetime.now(UTC), "test")


# What the tests present (the keeper's own verify is tested in tests/unit/test_tokens.py).
TOKENS = {f"{role.label}-token": _token(role) for role in Role}
ADMIN = {"Authorization": "Bearer admin-token"}


@dataclass
class Node:
    manager: AgentManager
    bus: NatsBus
    service: ManagerService
    subjects: Subjects


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path / "nats", authorization=False)
    await srv.start()
    yield srv
    await srv.stop()


def new_manager(store: MemoryStore | None = None, bus: NatsBus | None = None) -> AgentManager:
    settings = ManagerSettings(node="n1", monitoring_interval=60)
    return AgentManager(store or MemoryStore(), FakeRuntime(), settings, bus=bus)


def manager_service(manager: AgentManager, bus: NatsBus) -> ManagerService:
    # As the daemon wires it: the bus serves the subjects, the api's dispatch table answers.
    api = NatsManagerApi(manager, bus.subjects.manager_command, Gate(TOKENS.get))
    return ManagerService(bus, api.handle, node=manager.settings.node, version=opmasd.__version__)


async def start_node(url: str, prefix: str, store: MemoryStore | None = None) -> Node:
    # The daemon's order: bus, manager (it takes the bus), API.
    subjects = Subjects(prefix)
    bus = await NatsBus.connect(url, subjects=subjects)
    manager = new_manager(store, bus)
    await manager.start(discover=False)
    service = manager_service(manager, bus)
    await service.start()
    return Node(manager, bus, service, subjects)


async def stop_node(node: Node) -> None:
    await node.service.stop()
    await node.bus.close()
    await node.manager.stop(stop_agents=False)


@pytest.fixture
async def node(server: EmbeddedNatsServer) -> AsyncIterator[Node]:
    n = await start_node(server.url, "t")
    yield n
    await stop_node(n)


@pytest.fixture
async def client(server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url)
    yield nc
    await nc.close()


async def ask(
    nc: Client, body: Any, subject: str = "t.manager.command", headers: dict[str, str] | None = ADMIN
) -> dict[str, Any]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, payload, timeout=5, headers=headers)
    reply: dict[str, Any] = json.loads(msg.data)
    assert reply["timestamp"].endswith("Z")
    return reply


def ok(reply: dict[str, Any]) -> Any:
    assert reply["status"] == "success", reply
    assert reply["error"] is None
    return reply["result"]


def failed(reply: dict[str, Any], code: str) -> dict[str, Any]:
    assert reply["status"] == "error" and reply["code"] == code, reply
    assert reply["error"] and reply["result"] is None
    return reply


async def test_every_command_round_trips(node: Node, client: Client) -> None:
    await node.manager.create_agent(SLEEP)
    started = ok(await ask(client, {"command": "start", "agent_id": "sleeper"}))
    assert started["changed"] and started["agent"]["state"] == "running" and started["agent"]["pid"]

    status = ok(await ask(client, {"command": "status", "agent_id": "sleeper"}))
    assert {k: status[k] for k in ("agent_id", "name", "type", "node", "state", "desired_state")} == {
        "agent_id": "sleeper",
        "name": "sleeper",
        "type": "collector",
        "node": "n1",
        "state": "running",
        "desired_state": "running",
    }
    assert status["uptime_seconds"] >= 0 and status["restart_count"] == 0 and status["last_exit"] is None
    assert status["source"] == "registered" and "spec" not in status
    assert set(status) >= {"version", "state_reason", "last_heartbeat", "manifest_path", "pid"}

    got = ok(await ask(client, {"command": "get", "agent_id": "sleeper"}))
    assert got["spec"]["command"] == ["sleep", "100"] and got["created_at"].endswith("Z")

    listed = ok(await ask(client, {"command": "list", "params": {"state": "running", "type": "collector"}}))
    assert [a["agent_id"] for a in listed["agents"]] == ["sleeper"] and listed["total"] == 1
    assert ok(await ask(client, {"command": "list", "params": {"state": "stopped"}}))["total"] == 0
    assert ok(await ask(client, {"command": "list", "params": {"node": "elsewhere"}}))["total"] == 0

    restarted = ok(await ask(client, {"command": "restart", "agent_id": "sleeper"}))
    assert restarted["agent"]["state"] == "running" and restarted["agent"]["pid"] != started["agent"]["pid"]
    stopped = ok(await ask(client, {"command": "stop", "agent_id": "sleeper", "params": {"timeout": 2.5}}))
    assert stopped["changed"] and stopped["agent"]["state"] == "stopped"
    assert stopped["agent"]["last_exit"]["reason"].startswith("killed by")

    assert ok(await ask(client, {"command": "discover"})) == {"agents": [], "errors": []}
    deleted = ok(await ask(client, {"command": "delete", "agent_id": "sleeper"}))
    assert deleted == {"agent_id": "sleeper", "deleted": True, "message": "agent sleeper deleted"}
    failed(await ask(client, {"command": "status", "agent_id": "sleeper"}), "NOT_FOUND")


async def test_domain_errors_come_back_with_codes(
    node: Node, client: Client, server: EmbeddedNatsServer
) -> None:
    missing = failed(await ask(client, {"command": "start", "agent_id": "ghost"}), "NOT_FOUND")
    assert missing["resource"] == {"type": "agent", "name": "ghost"} and missing["agent_id"] == "ghost"
    bad_id = failed(await ask(client, {"command": "status", "agent_id": "Not An Id"}), "INVALID_ARGUMENT")
    assert bad_id["violations"][0]["field"] == "agent_id"
    await node.manager.create_agent(SLEEP)
    negative = failed(
        await ask(client, {"command": "stop", "agent_id": "sleeper", "params": {"timeout": -1}}),
        "INVALID_ARGUMENT",
    )
    assert negative["violations"] == [
        {"field": "timeout", "description": "must be between 0 and 86400s (a day), got -1s"}
    ]


async def test_an_agent_of_another_node_is_a_failed_precondition(
    server: EmbeddedNatsServer, client: Client
) -> None:
    store = MemoryStore()
    store.save_agent(AgentRecord("remote", AgentSpec("remote", ("sleep", "1")), node="n2"))
    n = await start_node(server.url, "t", store)
    try:
        reply = failed(await ask(client, {"command": "start", "agent_id": "remote"}), "FAILED_PRECONDITION")
        assert "runs on node 'n2'" in reply["error"]
    finally:
        await stop_node(n)


async def test_query_subject_takes_only_reads(node: Node, client: Client) -> None:
    await node.manager.create_agent(SLEEP)
    q = "t.manager.query"
    assert ok(await ask(client, {"command": "status", "agent_id": "sleeper"}, q))["state"] == "stopped"
    assert ok(await ask(client, {"command": "list"}, q))["total"] == 1
    assert ok(await ask(client, {"command": "get", "agent_id": "sleeper"}, q))["spec"]["name"] == "sleeper"
    refused = failed(await ask(client, {"command": "start", "agent_id": "sleeper"}, q), "INVALID_ARGUMENT")
    assert "t.manager.command" in refused["error"]
    assert node.manager.get_agent("sleeper").state.value == "stopped"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "malformed request: not JSON"),
        (b"[1]", "malformed request: not a JSON object"),
        ({"agent_id": "x"}, "malformed request: command: missing"),
        ({"command": 5}, "malformed request: command: must be a string"),
        ({"command": "status", "params": []}, "malformed request: params: must be an object"),
        ({"command": "explode"}, "command: unknown command 'explode'"),
        ({"command": "status"}, "agent_id: missing"),
        ({"command": "list", "params": {"state": "dancing"}}, "params.state: 'dancing' is not one of"),
        (
            {"command": "stop", "agent_id": "a", "params": {"timeout": "soon"}},
            "params.timeout: must be a number",
        ),
        (
            {"command": "stop", "agent_id": "a", "params": {"timeout": True}},
            "params.timeout: must be a number",
        ),
        (b"\x00" * 1_000_000, "malformed request: message too large (1000000 bytes"),
    ],
)
async def test_malformed_requests_get_error_responses(
    node: Node, client: Client, body: Any, reason: str
) -> None:
    reply = failed(await ask(client, body), "INVALID_ARGUMENT")
    assert reply["error"].startswith(reason), reply["error"]
    assert node.service.malformed_counts() == {"t.manager.command": 1}


async def test_garbage_barrage_without_reply_is_counted_and_quiet(node: Node, client: Client) -> None:
    with capture_logs() as logs:
        for i in range(1000):
            await client.publish("t.manager.command", b"\x01garbage %d" % i)  # no reply subject
        await client.publish("t.manager.command", b"x" * 1_000_000)
        # Requests run concurrently; the counts settle once all 1001 were handled.
        for _ in range(250):
            if node.service.malformed_counts().get("t.manager.command") == 1001:
                break
            await asyncio.sleep(0.02)
        assert ok(await ask(client, {"command": "list"}))["total"] == 0
    assert node.service.malformed_counts() == {"t.manager.command": 1001}
    assert len([e for e in logs if e["event"].startswith("malformed manager request")]) == 1


async def test_responses_are_published_for_listeners(node: Node, client: Client) -> None:
    await node.manager.create_agent(SLEEP)
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def listen(msg: Msg) -> None:
        heard.put_nowait(json.loads(msg.data))

    await client.subscribe("t.manager.response", cb=listen)
    await server_has_seen(client)
    # Fire and forget: no reply subject, the command still runs and its response is heard.
    await client.publish(
        "t.manager.command", json.dumps({"command": "start", "agent_id": "sleeper"}).encode(), headers=ADMIN
    )
    response = await asyncio.wait_for(heard.get(), 5)
    assert response["command"] == "start" and response["status"] == "success"
    assert response["result"]["agent"]["state"] == "running"
    failed(await ask(client, {"command": "status", "agent_id": "nope"}), "NOT_FOUND")
    assert (await asyncio.wait_for(heard.get(), 5))["code"] == "NOT_FOUND"


async def test_custom_command_to_an_agent(node: Node, client: Client) -> None:
    await node.manager.create_agent(SLEEP)
    request = {"command": "command", "agent_id": "sleeper", "params": {"command": "ping", "params": {"x": 1}}}
    not_running = failed(await ask(client, request), "FAILED_PRECONDITION")
    assert "not running" in not_running["error"]
    await node.manager.start_agent("sleeper")

    async def agent(msg: Msg) -> None:
        cmd = json.loads(msg.data)
        if cmd["command"] == "ping":
            await msg.respond(codec.encode_response("success", "ping", "sleeper", {"pong": cmd["params"]}))
        else:
            await msg.respond(
                codec.encode_response("error", cmd["command"], "sleeper", error="no such command")
            )

    await client.subscribe("t.sleeper.command", cb=agent)
    await server_has_seen(client)
    assert ok(await ask(client, request)) == {"pong": {"x": 1}}
    refused = await ask(client, {**request, "params": {"command": "fly"}})
    assert (
        refused["status"] == "error"
        and refused["code"] == "AGENT_ERROR"
        and refused["error"] == "no such command"
    )
    await node.manager.create_agent({"name": "quiet", "command": ("sleep", "100")}, start=True)
    timeout = {"command": "command", "agent_id": "quiet", "params": {"command": "ping", "timeout": 0.2}}
    failed(await ask(client, timeout), "DEADLINE_EXCEEDED")
    for params, field in [
        ({"params": {}}, "params.command"),
        ({"command": "ping", "params": [1]}, "params.params"),
        ({"command": "ping", "timeout": "1s"}, "params.timeout"),
        ({"command": "ping", "timeout": 0}, "timeout"),
    ]:
        bad = {"command": "command", "agent_id": "sleeper", "params": params}
        assert failed(await ask(client, bad), "INVALID_ARGUMENT")["violations"][0]["field"] == field


async def test_commands_need_nats_on_the_manager_side(server: EmbeddedNatsServer, client: Client) -> None:
    # A manager built without a bus (the API still reached over some other bus): UNAVAILABLE.
    bus = await NatsBus.connect(server.url, subjects=Subjects("t"))
    manager = new_manager()
    await manager.start(discover=False)
    api = manager_service(manager, bus)
    await api.start()
    try:
        await manager.create_agent(SLEEP, start=True)
        request = {"command": "command", "agent_id": "sleeper", "params": {"command": "ping"}}
        assert "need NATS" in failed(await ask(client, request), "UNAVAILABLE")["error"]
    finally:
        await api.stop()
        await bus.close()
        await manager.stop(stop_agents=False)


async def test_discoverable_as_a_micro_service(node: Node, client: Client) -> None:
    ping = json.loads((await client.request("$SRV.PING", b"", timeout=2)).data)
    assert (ping["name"], ping["version"]) == ("opmasd", opmasd.__version__)
    assert ping["metadata"] == {"node": "n1", "subject_prefix": "t"}
    info = json.loads((await client.request("$SRV.INFO.opmasd", b"", timeout=2)).data)
    assert sorted(e["subject"] for e in info["endpoints"]) == ["t.manager.command", "t.manager.query"]
    ok(await ask(client, {"command": "list"}))
    stats = json.loads((await client.request("$SRV.STATS.opmasd", b"", timeout=2)).data)
    counts = {e["subject"]: e["num_requests"] for e in stats["endpoints"]}
    assert counts == {"t.manager.command": 1, "t.manager.query": 0}


async def test_two_prefixes_on_one_server_do_not_see_each_other(
    server: EmbeddedNatsServer, client: Client
) -> None:
    one = await start_node(server.url, "site1")
    two = await start_node(server.url, "site2.opmas")
    try:
        await one.manager.create_agent({"name": "only-in-one", "command": ("sleep", "1")})
        listed = ok(await ask(client, {"command": "list"}, "site1.manager.command"))
        assert [a["agent_id"] for a in listed["agents"]] == ["only-in-one"]
        assert ok(await ask(client, {"command": "list"}, "site2.opmas.manager.command"))["total"] == 0
        failed(
            await ask(client, {"command": "status", "agent_id": "only-in-one"}, "site2.opmas.manager.query"),
            "NOT_FOUND",
        )

        beats: list[tuple[str, str]] = []
        one.bus.set_handlers(lambda h: beats.append(("one", h.agent_id)), lambda m: None)
        two.bus.set_handlers(lambda h: beats.append(("two", h.agent_id)), lambda m: None)
        await client.publish("site2.opmas.status", json.dumps({"agent_id": "b", "status": "ok"}).encode())
        await client.publish("site1.status", json.dumps({"agent_id": "a", "status": "ok"}).encode())
        await server_has_seen(client)
        for _ in range(100):
            if len(beats) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sorted(beats) == [("one", "a"), ("two", "b")]
    finally:
        await stop_node(one)
        await stop_node(two)


async def test_api_started_before_nats_is_up_serves_once_it_is(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    bus = await NatsBus.connect(url, subjects=Subjects("t"), initial_wait=0.05)
    manager = new_manager(bus=bus)
    await manager.start(discover=False)
    api = manager_service(manager, bus)
    await api.start()
    server = EmbeddedNatsServer(tmp_path, port=port, authorization=False)
    try:
        await server.start()
        assert await bus.wait_connected(10)
        nc = await nats.connect(url)
        try:
            assert ok(await ask(nc, {"command": "list"}))["total"] == 0
        finally:
            await nc.close()
    finally:
        await api.stop()
        await bus.close()
        await server.stop()
        await manager.stop(stop_agents=False)


async def test_requests_need_a_token_with_the_commands_role(node: Node, client: Client) -> None:
    """Who may run what is the gRPC API's rule (api.auth): list is a viewer's, stop an operator's,
    delete an admin's; without a valid token nothing runs."""
    await node.manager.create_agent(SLEEP)
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-token"}):
        reply = failed(await ask(client, {"command": "list"}, headers=headers), "UNAUTHENTICATED")
        assert "authorization: Bearer" in reply["error"]
    viewer = {"Authorization": "Bearer viewer-token"}
    assert ok(await ask(client, {"command": "list"}, "t.manager.query", headers=viewer))
    stop = {"command": "stop", "agent_id": "sleeper"}
    reply = failed(await ask(client, stop, headers=viewer), "PERMISSION_DENIED")
    assert "operator" in reply["error"]
    ok(await ask(client, stop, headers={"Authorization": "Bearer operator-token"}))
    delete = {"command": "delete", "agent_id": "sleeper"}
    failed(await ask(client, delete, headers={"Authorization": "Bearer operator-token"}), "PERMISSION_DENIED")
    ok(await ask(client, delete, headers={"authorization": "bearer admin-token"}))
