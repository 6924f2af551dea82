"""Each agent's own login to the embedded nats-server, tried as a client sees it.

Two agents, a and b, log in with what opmasd would start them with (EmbeddedAgentLogins'
environment). a may use its own subjects, its own inbox and the configured data subjects; it
cannot command b, speak in b's name, read the manager's subjects or anyone's replies — each
refusal is the server's permissions violation reaching a's error callback, and the message
reaching nobody. Logins follow the agents: an agent admitted at run time gets one, a deleted
one loses it (and its connection), bursts of changes share reloads, restarts keep passwords.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from opmasd.bus.agent_logins import EmbeddedAgentLogins
from opmasd.bus.connection import NatsBus
from opmasd.bus.embedded import USER, EmbeddedNatsServer
from opmasd.bus.embedded_users import DataSubjects, accepts_login
from opmasd.bus.login import NatsLogin
from opmasd.bus.registration import server_has_seen
from opmasd.bus.subjects import Subjects
from opmasd.core.model import AgentRecord, AgentSpec

PREFIX = "t"
DATA = DataSubjects(publish=("findings.>",), subscribe=("logs.>", "findings.>"))


class Agent:
    """A plain nats-py client logged in as one agent, with the errors the server sent it."""

    def __init__(
        self, nc: Client, errors: list[str], server: EmbeddedNatsServer, env: dict[str, str]
    ) -> None:
        self.nc = nc
        self.errors = errors
        self.server = server
        self.env = env

    async def refused(self, what: str, subject: str) -> None:
        """The server reported a permissions violation for `what` ("publish" / "subscription")
        to subject, and the connection stays up."""
        await server_has_seen(self.nc)
        for _ in range(100):
            # nats-py lowers the case of the server's message.
            wanted = f'permissions violation for {what} to "{subject}"'.lower()
            if any(wanted in e.lower() for e in self.errors):
                assert self.nc.is_connected
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {what} to {subject}: {self.errors}")


class Observer:
    """opmasd's own login, collecting what arrives on subjects."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.seen: list[tuple[str, bytes]] = []

    async def watch(self, *subjects: str) -> None:
        async def on_msg(msg: Msg) -> None:
            self.seen.append((msg.subject, msg.data))

        for subject in subjects:
            await self.nc.subscribe(subject, cb=on_msg)
        await server_has_seen(self.nc)

    def got(self, subject: str) -> list[bytes]:
        return [data for s, data in self.seen if s == subject]


def record(agent_id: str, node: str = "n1", deleted: bool = False) -> AgentRecord:
    return AgentRecord(agent_id, AgentSpec(name=agent_id, command=("true",)), node=node, deleted=deleted)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path / "nats", subjects=Subjects(PREFIX), data=DATA)
    yield srv
    await srv.stop()


@pytest.fixture
async def logins(server: EmbeddedNatsServer) -> AsyncIterator[EmbeddedAgentLogins]:
    keeper = EmbeddedAgentLogins(server, admit_timeout=10)
    # Known at start (in the first configuration), and what is not: another node's, a deleted one.
    keeper.expect([record("a"), record("b"), record("other", node="n2"), record("gone", deleted=True)], "n1")
    await server.start()
    yield keeper
    await keeper.close()


async def login_as(server: EmbeddedNatsServer, env: dict[str, str], **options: Any) -> Agent:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    options.setdefault("inbox_prefix", env["NATS_INBOX_PREFIX"])
    nc = await nats.connect(
        server.url,
        user=env["NATS_USER"],
        password=env["NATS_PASSWORD"],
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=2,
        **options,
    )
    return Agent(nc, errors, server, env)


@pytest.fixture
async def observer(server: EmbeddedNatsServer, logins: EmbeddedAgentLogins) -> AsyncIterator[Observer]:
    nc = await nats.connect(server.url, user=USER, password=server.password, connect_timeout=2)
    yield Observer(nc)
    await nc.close()


@pytest.fixture
async def agent_a(server: EmbeddedNatsServer, logins: EmbeddedAgentLogins) -> AsyncIterator[Agent]:
    agent = await login_as(server, dict(logins.environment("a")))
    yield agent
    await agent.nc.close()


def heartbeat(agent_id: str) -> bytes:
    return json.dumps({"agent_id": agent_id, "status": "running"}).encode()


async def test_the_environment_is_a_login_of_the_agents_own(
    server: EmbeddedNatsServer, logins: EmbeddedAgentLogins
) -> None:
    env = logins.environment("a")
    assert env["NATS_USER"] == "agent-a" and env["NATS_INBOX_PREFIX"] == "_INBOX.a"
    assert env["NATS_PASSWORD"] not in (server.password, logins.environment("b")["NATS_PASSWORD"])
    assert len(env["NATS_PASSWORD"]) >= 40
    assert await accepts_login(
        server.host, int(server.url.rsplit(":", 1)[1]), "agent-a", env["NATS_PASSWORD"]
    )
    port = int(server.url.rsplit(":", 1)[1])
    # A wrong password, another agent's password, and agents not of this node or deleted: refused.
    assert not await accepts_login(server.host, port, "agent-a", env["NATS_PASSWORD"][:-1] + "x")
    assert not await accepts_login(server.host, port, "agent-a", logins.environment("b")["NATS_PASSWORD"])
    for stranger in ("other", "gone"):
        assert not await accepts_login(
            server.host, port, f"agent-{stranger}", logins.environment(stranger)["NATS_PASSWORD"]
        )
    with pytest.raises((nats.errors.Error, OSError)):
        await login_as(server, {**env, "NATS_PASSWORD": "guess"}, max_reconnect_attempts=0)


async def test_an_agent_cannot_command_another_nor_speak_in_its_name(
    agent_a: Agent, observer: Observer
) -> None:
    forbidden = [f"{PREFIX}.b.command", f"{PREFIX}.b.query", f"{PREFIX}.b.status", f"{PREFIX}.b.metrics",
                 f"{PREFIX}.b.response", f"{PREFIX}.status", f"{PREFIX}.metrics", f"{PREFIX}.manager.command",
                 "_INBOX.manager.x.b.y", "logs.device-1"]  # fmt: skip
    await observer.watch(*forbidden)
    for subject in forbidden:
        await agent_a.nc.publish(subject, heartbeat("b"))
        await agent_a.refused("publish", subject)
    await server_has_seen(observer.nc)
    assert observer.seen == []


async def test_replying_to_a_request_it_sent_itself_does_not_open_another_agents_subject(
    agent_a: Agent, observer: Observer
) -> None:
    # With allow_responses an agent could name b's command subject as the reply of a data
    # message, receive its own message and "reply": it is not given that permission.
    await observer.watch(f"{PREFIX}.b.command")

    async def answer(msg: Msg) -> None:
        if msg.reply:
            await agent_a.nc.publish(msg.reply, b'{"command": "stop"}')

    await agent_a.nc.subscribe("findings.>", cb=answer)
    await agent_a.nc.publish("findings.x", b"{}", reply=f"{PREFIX}.b.command")
    await agent_a.refused("publish", f"{PREFIX}.b.command")
    await server_has_seen(observer.nc)
    assert observer.got(f"{PREFIX}.b.command") == []


async def test_an_agent_cannot_read_the_manager_another_agent_or_anyones_replies(
    agent_a: Agent, observer: Observer
) -> None:
    manager, others = f"{PREFIX}.manager", f"{PREFIX}.b"
    refused = [f"{manager}.>", f"{manager}.command", f"{others}.command", f"{PREFIX}.*.command",
               f"{PREFIX}.>", "_INBOX.>", "_INBOX.manager.>", "_INBOX.b.>", ">"]  # fmt: skip
    for subject in refused:
        got: list[Msg] = []

        async def keep(msg: Msg, got: list[Msg] = got) -> None:
            got.append(msg)

        await agent_a.nc.subscribe(subject, cb=keep)
        await agent_a.refused("subscription", subject)
        assert got == []
    # Nor with a client's default inbox (_INBOX.<random>): its requests' replies never arrive.
    lost = await login_as(agent_a.server, agent_a.env, inbox_prefix="_INBOX")
    try:
        with pytest.raises(nats.errors.Error):
            await lost.nc.request("findings.lookup", b"{}", timeout=0.5)
    finally:
        await lost.nc.close()


async def test_an_agent_uses_its_own_subjects_its_inbox_and_the_data_subjects(
    server: EmbeddedNatsServer, agent_a: Agent, observer: Observer
) -> None:
    own = [f"{PREFIX}.a.status", f"{PREFIX}.a.metrics", f"{PREFIX}.a.response", "findings.a"]
    await observer.watch(*own)
    for subject in own:
        await agent_a.nc.publish(subject, heartbeat("a"))
    received: dict[str, list[bytes]] = {}

    def keeper(into: list[bytes]) -> Any:
        async def keep(msg: Msg) -> None:
            into.append(msg.data)

        return keep

    for subject in (f"{PREFIX}.a.command", f"{PREFIX}.a.query", "logs.>", "findings.>"):
        await agent_a.nc.subscribe(subject, cb=keeper(received.setdefault(subject, [])))
    await server_has_seen(agent_a.nc)
    for subject in (f"{PREFIX}.a.command", f"{PREFIX}.a.query", "logs.dev1", "findings.b"):
        await observer.nc.publish(subject, b"{}")

    # A request of its own, on its own inbox, answered by someone allowed to (here opmasd's login).
    async def lookup(msg: Msg) -> None:
        await observer.nc.publish(msg.reply, b'{"found": true}')

    await observer.nc.subscribe("findings.lookup", cb=lookup)
    await server_has_seen(observer.nc)
    reply = await agent_a.nc.request("findings.lookup", b"{}", timeout=2)
    assert json.loads(reply.data) == {"found": True}
    await server_has_seen(observer.nc)
    assert all(observer.got(subject) == [heartbeat("a")] for subject in own), observer.seen
    for _ in range(100):
        if all(len(got) == 1 for got in received.values() if got is not received["findings.>"]):
            break
        await asyncio.sleep(0.02)
    assert {subject: len(got) for subject, got in received.items()} == {
        f"{PREFIX}.a.command": 1, f"{PREFIX}.a.query": 1, "logs.>": 1, "findings.>": 2,
    }  # fmt: skip
    assert agent_a.errors == []


async def test_an_agent_answers_opmasds_commands(server: EmbeddedNatsServer, agent_a: Agent) -> None:
    async def answer(msg: Msg) -> None:
        reply = {"status": "success", "command": "ping", "agent_id": "a", "result": "pong"}
        await agent_a.nc.publish(msg.reply, json.dumps(reply).encode())

    await agent_a.nc.subscribe(f"{PREFIX}.a.command", cb=answer)
    await server_has_seen(agent_a.nc)
    bus = await NatsBus.connect(
        server.url, login=NatsLogin(user=USER, password=server.password), subjects=Subjects(PREFIX)
    )
    try:
        reply = await bus.command_agent("a", "ping", {}, timeout=3)
        assert (reply.status, reply.result) == ("success", "pong")
    finally:
        await bus.close()
    assert agent_a.errors == []


async def test_a_login_made_at_run_time_works_and_a_forgotten_one_stops(
    server: EmbeddedNatsServer, logins: EmbeddedAgentLogins
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    late = logins.environment("late")
    assert not await accepts_login(server.host, port, "agent-late", late["NATS_PASSWORD"])
    await logins.admit("late")  # returns once the server takes it
    assert await accepts_login(server.host, port, "agent-late", late["NATS_PASSWORD"])
    closed = asyncio.Event()
    await login_as(server, dict(logins.environment("b")), closed_cb=closed_cb(closed))
    logins.forget("b")
    assert await logins.settled(10)
    assert not await accepts_login(server.host, port, "agent-b", logins.environment("b")["NATS_PASSWORD"])
    await asyncio.wait_for(closed.wait(), 5)  # the server dropped its connection
    # Admitted again (re-registered): its login is back, with the same password.
    await logins.admit("b")
    assert await accepts_login(server.host, port, "agent-b", logins.environment("b")["NATS_PASSWORD"])


def closed_cb(event: asyncio.Event) -> Any:
    async def on_closed() -> None:
        event.set()

    return on_closed


async def test_many_agents_at_once_share_a_few_reloads(
    server: EmbeddedNatsServer, logins: EmbeddedAgentLogins
) -> None:
    before = logins.reloads
    ids = [f"bulk-{i}" for i in range(300)]
    await asyncio.wait_for(asyncio.gather(*(logins.admit(agent_id) for agent_id in ids)), 30)
    assert logins.reloads - before <= 3
    port = int(server.url.rsplit(":", 1)[1])
    for agent_id in (ids[0], ids[-1]):
        assert await accepts_login(
            server.host, port, f"agent-{agent_id}", logins.environment(agent_id)["NATS_PASSWORD"]
        )
    # Admitting one that has its login already costs no reload.
    await logins.admit(ids[5])
    assert logins.reloads - before <= 3


async def test_passwords_survive_a_restart_of_opmasd_and_of_its_server(tmp_path: Path) -> None:
    first = EmbeddedNatsServer(tmp_path / "nats", subjects=Subjects(PREFIX))
    logins = EmbeddedAgentLogins(first)
    logins.expect([record("a")], "n1")
    await first.start()
    env = dict(logins.environment("a"))
    await logins.close()
    await first.stop()
    second = EmbeddedNatsServer(tmp_path / "nats", subjects=Subjects(PREFIX))
    again = EmbeddedAgentLogins(second)
    again.expect([record("a")], "n1")
    try:
        await second.start()
        assert dict(again.environment("a")) == env
        agent = await login_as(second, env)
        await agent.nc.close()
    finally:
        await again.close()
        await second.stop()


def test_data_subjects_that_reach_beyond_data_are_refused(tmp_path: Path) -> None:
    for pattern in (">", f"{PREFIX}.>", "*.status", "_INBOX.>"):
        with pytest.raises(ValueError, match="could match"):
            EmbeddedNatsServer(tmp_path, subjects=Subjects(PREFIX), data=DataSubjects(publish=(pattern,)))
