"""The agent SDK (agents/opmas_agent) through its own testing harness: no NATS, no processes."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents"))

import opmas_agent
from opmas_agent import (
    Agent,
    AgentContext,
    CommandError,
    ConfigError,
    command,
    parse_timestamp,
    timestamp,
)
from opmas_agent._transport import subject_matches
from opmas_agent.testing import AgentHarness, MemoryTransport, NoResponders

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
RESPONSE_KEYS = {"status", "command", "agent_id", "result", "error", "timestamp"}


class Echo(Agent):
    """An agent with a bit of everything the SDK offers."""

    default_id = "echo"

    async def setup(self) -> None:
        self.limit = self.setting("ECHO_LIMIT", 3)
        self.enabled = self.setting("ECHO_ENABLED", True)
        self.token = self.setting("ECHO_API_TOKEN", "")
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.torn_down = False
        await self.subscribe("logs.>", self.on_record)

    async def on_record(self, subject: str, record: dict[str, Any]) -> None:
        if record.get("explode"):
            raise RuntimeError("handler bug")
        self.records.append((subject, record))
        self.metrics["records"] = len(self.records)

    async def teardown(self) -> None:
        self.torn_down = True

    @command
    async def echo(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"echo": params}

    @command("add-up")
    def add_up(self, params: dict[str, Any]) -> int:
        values = params.get("values")
        if not isinstance(values, list):
            raise CommandError("params.values: a list of numbers is required")
        return sum(values)

    @command
    def crash(self, params: dict[str, Any]) -> None:
        raise ZeroDivisionError("oops")

    @command
    def opaque(self, params: dict[str, Any]) -> object:
        return object()  # not JSON

    async def on_command(self, command: str, params: dict[str, Any]) -> Any:
        if command == "dynamic":
            return "handled by on_command"
        return await super().on_command(command, params)


ENV = {
    "AGENT_ID": "echo-1",
    "AGENT_NAME": "echo",
    "AGENT_TYPE": "test",
    "AGENT_VERSION": "2.3.4",
    "AGENT_HEARTBEAT_INTERVAL": "15",
    "NATS_URL": "nats://probe:s3cret@nats.example:4222",
    "ECHO_LIMIT": "7",
    "ECHO_API_TOKEN": "do-not-show",
}


@pytest.fixture
async def harness() -> Any:
    async with AgentHarness(Echo, env=ENV) as h:
        yield h


# -- the public surface changes only on purpose ------------------------------------------------


def test_public_names() -> None:
    assert set(opmas_agent.__all__) == {
        "Agent",
        "AgentContext",
        "CommandError",
        "ConfigError",
        "__version__",
        "command",
        "parse_timestamp",
        "run",
        "timestamp",
    }
    for name in opmas_agent.__all__:
        assert getattr(opmas_agent, name) is not None
    assert set(opmas_agent.testing.__all__) == {"AgentHarness", "MemoryTransport", "NoResponders"}


# -- built-in commands ----------------------------------------------------------------------------


async def test_ping(harness: AgentHarness[Echo]) -> None:
    reply = await harness.command("ping")
    assert set(reply) == RESPONSE_KEYS
    assert reply["status"] == "success"
    assert reply["command"] == "ping"
    assert reply["agent_id"] == "echo-1"
    assert reply["result"] == "pong"
    assert reply["error"] is None
    assert RFC3339_UTC.match(reply["timestamp"])


async def test_status_reports_state_uptime_and_counters(harness: AgentHarness[Echo]) -> None:
    await harness.deliver("logs.rtr-1", {"device": "rtr-1"})
    await harness.command("ping")
    result = (await harness.command("status"))["result"]
    assert result["state"] == "running"
    assert result["agent_id"] == "echo-1"
    assert (result["name"], result["type"], result["version"]) == ("echo", "test", "2.3.4")
    assert result["uptime_seconds"] >= 0
    assert result["connected"] is True
    assert result["counters"]["messages_received"] == 1
    assert result["counters"]["commands_handled"] == 1  # the ping; status itself is still running
    assert result["metrics"] == {"records": 1}
    assert result["commands"] == ["add-up", "config", "crash", "echo", "opaque", "ping", "status"]


async def test_config_shows_effective_settings_without_secrets(harness: AgentHarness[Echo]) -> None:
    result = (await harness.command("config"))["result"]
    assert result["agent_id"] == "echo-1"
    assert result["heartbeat_interval"] == 15.0
    assert result["subject_prefix"] == "agent"
    assert result["nats_url"] == "nats://probe:***@nats.example:4222"
    assert result["settings"] == {"ECHO_LIMIT": 7, "ECHO_ENABLED": True, "ECHO_API_TOKEN": "***"}
    assert "s3cret" not in str(result) and "do-not-show" not in str(result)


async def test_query_subject_answers_too(harness: AgentHarness[Echo]) -> None:
    reply = await harness.command("ping", kind="query")
    assert reply["result"] == "pong"


async def test_every_reply_is_also_published_on_response(harness: AgentHarness[Echo]) -> None:
    await harness.command("ping")
    await harness.command("nope")
    announced = harness.published_on("agent.echo-1.response")
    assert [(r["command"], r["status"]) for r in announced] == [("ping", "success"), ("nope", "error")]


# -- custom commands ------------------------------------------------------------------------------


async def test_custom_commands_by_decorator(harness: AgentHarness[Echo]) -> None:
    assert (await harness.command("echo", {"a": 1}))["result"] == {"echo": {"a": 1}}
    assert (await harness.command("add-up", {"values": [1, 2, 3]}))["result"] == 6


async def test_unknown_commands_go_to_on_command(harness: AgentHarness[Echo]) -> None:
    assert (await harness.command("dynamic"))["result"] == "handled by on_command"
    reply = await harness.command("nope")
    assert reply["status"] == "error"
    assert reply["result"] is None
    assert "unknown command 'nope'" in reply["error"]
    assert "ping" in reply["error"]  # the error lists what is known


async def test_command_errors_become_error_replies(harness: AgentHarness[Echo]) -> None:
    refused = await harness.command("add-up", {"values": "x"})
    assert (refused["status"], refused["error"]) == ("error", "params.values: a list of numbers is required")
    crashed = await harness.command("crash")
    assert crashed["status"] == "error"
    assert crashed["error"] == "internal error: ZeroDivisionError: oops"
    opaque = await harness.command("opaque")
    assert opaque["status"] == "error" and "not JSON serialisable" in opaque["error"]
    # None of it hurt the agent.
    assert (await harness.command("ping"))["result"] == "pong"
    counters = (await harness.command("status"))["result"]["counters"]
    assert counters["commands_failed"] == 3


@pytest.mark.parametrize(
    ("payload", "command_name", "error"),
    [
        (b"not json at all", "", "malformed request: not JSON"),
        (b"\xff\xfe", "", "malformed request: not JSON"),
        (b"[1, 2]", "", "malformed request: expected a JSON object"),
        (b'{"params": {}}', "", "malformed request: 'command' must be a non-empty string"),
        (b'{"command": 42}', "", "malformed request: 'command' must be a non-empty string"),
        (b'{"command": "ping", "params": [1]}', "ping", "malformed request: 'params' must be an object"),
        (
            b'{"command": "ping", "agent_id": "other"}',
            "ping",
            "request for agent 'other' reached agent 'echo-1'",
        ),
    ],
)
async def test_malformed_requests_get_error_replies(
    harness: AgentHarness[Echo], payload: bytes, command_name: str, error: str
) -> None:
    reply = await harness.request("agent.echo-1.command", payload)
    assert set(reply) == RESPONSE_KEYS
    assert reply["status"] == "error"
    assert reply["command"] == command_name
    assert reply["error"].startswith(error)
    assert (await harness.command("ping"))["result"] == "pong"
    assert (await harness.command("status"))["result"]["counters"]["commands_malformed"] == 1


async def test_request_without_params_or_agent_id_is_fine(harness: AgentHarness[Echo]) -> None:
    reply = await harness.request("agent.echo-1.command", {"command": "ping"})
    assert reply["result"] == "pong"


async def test_a_subclass_can_replace_a_builtin() -> None:
    class Quiet(Agent):
        @command("ping")
        def my_ping(self, params: dict[str, Any]) -> str:
            return "PONG!"

    async with AgentHarness(Quiet) as harness:
        assert (await harness.command("ping"))["result"] == "PONG!"
        assert (await harness.command("status"))["status"] == "success"


# -- heartbeats and metrics -----------------------------------------------------------------------


async def test_heartbeat_payload(harness: AgentHarness[Echo]) -> None:
    await harness.heartbeat()
    [beat] = harness.published_on("agent.*.status")
    assert set(beat) == {"agent_id", "status", "timestamp", "metadata"}
    assert beat["agent_id"] == "echo-1"
    assert beat["status"] == "running"
    assert RFC3339_UTC.match(beat["timestamp"])
    moment = parse_timestamp(beat["timestamp"])
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=5)
    meta = beat["metadata"]
    assert (meta["name"], meta["type"], meta["version"]) == ("echo", "test", "2.3.4")
    assert meta["heartbeat_interval"] == 15.0
    assert isinstance(meta["pid"], int) and meta["uptime_seconds"] >= 0


async def test_status_and_metadata_are_the_agents_to_set(harness: AgentHarness[Echo]) -> None:
    harness.agent.status = "degraded"
    harness.agent.status_metadata["reason"] = "upstream slow"
    await harness.heartbeat()
    [beat] = harness.published_on("agent.*.status")
    assert beat["status"] == "degraded"
    assert beat["metadata"]["reason"] == "upstream slow"
    assert (await harness.command("status"))["result"]["state"] == "degraded"


async def test_metrics_published_with_the_heartbeat(harness: AgentHarness[Echo]) -> None:
    await harness.deliver("logs.a", {"n": 1})
    harness.agent.metrics["queue_depth"] = 4.5
    await harness.heartbeat()
    [metrics] = harness.published_on("agent.*.metrics")
    assert set(metrics) == {"agent_id", "timestamp", "metrics"}
    assert metrics["agent_id"] == "echo-1"
    assert RFC3339_UTC.match(metrics["timestamp"])
    values = metrics["metrics"]
    assert values["records"] == 1 and values["queue_depth"] == 4.5
    assert values["messages_received"] == 1 and values["heartbeats"] == 1
    assert all(isinstance(v, int | float) for v in values.values())


async def test_subject_prefix_from_the_environment() -> None:
    async with AgentHarness(Echo, env={**ENV, "NATS_SUBJECT_PREFIX": "site1.agent"}) as harness:
        assert (await harness.command("ping"))["result"] == "pong"
        with pytest.raises(NoResponders):
            await harness.request("agent.echo-1.command", {"command": "ping"})
        await harness.heartbeat()
        subjects = [subject for subject, _ in harness.published]
        assert subjects == [
            "site1.agent.echo-1.response",
            "site1.agent.echo-1.status",
            "site1.agent.echo-1.metrics",
        ]


# -- data subscriptions ---------------------------------------------------------------------------


async def test_data_subscriptions_get_decoded_records(harness: AgentHarness[Echo]) -> None:
    assert await harness.deliver("logs.edge.rtr-1", {"device": "rtr-1"}) == 1
    assert await harness.deliver("metrics.other", {"device": "x"}) == 0
    assert harness.agent.records == [("logs.edge.rtr-1", {"device": "rtr-1"})]


async def test_bad_messages_and_failing_handlers_are_counted_not_fatal(harness: AgentHarness[Echo]) -> None:
    await harness.deliver("logs.a", b"{not json")
    await harness.deliver("logs.a", b'"a string"')
    await harness.deliver("logs.a", {"explode": True})
    await harness.deliver("logs.a", {"device": "ok"})
    counters = (await harness.command("status"))["result"]["counters"]
    assert counters["messages_received"] == 4
    assert counters["messages_malformed"] == 2
    assert counters["handler_errors"] == 1
    assert harness.agent.records == [("logs.a", {"device": "ok"})]


async def test_publish_serialises_datetimes_and_sets(harness: AgentHarness[Echo]) -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert await harness.agent.publish("findings.test", {"at": moment, "tags": {"b", "a"}})
    assert harness.published_on("findings.>") == [{"at": "2026-01-02T03:04:05.678Z", "tags": ["a", "b"]}]


# -- settings and context -------------------------------------------------------------------------


async def test_a_bad_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ECHO_LIMIT='many'"):
        async with AgentHarness(Echo, env={"ECHO_LIMIT": "many"}):
            pass
    with pytest.raises(ConfigError, match="ECHO_ENABLED='perhaps': expected true or false"):
        async with AgentHarness(Echo, env={"ECHO_ENABLED": "perhaps"}):
            pass


def test_context_defaults() -> None:
    context = AgentContext.from_env({}, default_id="solo")
    assert context.agent_id == "solo" and context.name == "solo"
    assert context.heartbeat_interval == 30.0
    assert context.nats_url == "nats://127.0.0.1:4222"
    assert context.subject_prefix == "agent"
    assert context.subject("command") == "agent.solo.command"
    # Replies to its own requests come to its own inbox: the only one its login may read.
    assert context.nats_inbox_prefix == "_INBOX.solo"
    given = AgentContext.from_env({"AGENT_ID": "a1", "NATS_INBOX_PREFIX": "_INBOX.x.a1"})
    assert given.nats_inbox_prefix == "_INBOX.x.a1" and given.describe()["nats_inbox_prefix"] == "_INBOX.x.a1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AGENT_HEARTBEAT_INTERVAL": "often"}, "AGENT_HEARTBEAT_INTERVAL='often'"),
        ({"AGENT_HEARTBEAT_INTERVAL": "0"}, "must be a positive number"),
        ({"AGENT_ID": "has space"}, "AGENT_ID='has space'"),
        ({"AGENT_ID": "a.b"}, "AGENT_ID='a.b'"),
        ({"NATS_SUBJECT_PREFIX": "agent.>"}, "NATS_SUBJECT_PREFIX"),
        ({"NATS_INBOX_PREFIX": "_INBOX.*"}, "NATS_INBOX_PREFIX"),
        ({"NATS_URL": "http://x:1"}, "NATS_URL"),
        ({"AGENT_LOG_LEVEL": "loud"}, "AGENT_LOG_LEVEL"),
    ],
)
def test_context_rejects_bad_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        AgentContext.from_env(env)


def test_context_accepts_a_seconds_suffix_and_fractions() -> None:
    assert AgentContext.from_env({"AGENT_HEARTBEAT_INTERVAL": "10s"}).heartbeat_interval == 10.0
    assert AgentContext.from_env({"AGENT_HEARTBEAT_INTERVAL": "0.25"}).heartbeat_interval == 0.25


# -- the whole life, on the memory transport ------------------------------------------------------


class Periodic(Agent):
    default_id = "periodic"
    fail_in: str = ""

    async def setup(self) -> None:
        if self.fail_in == "setup":
            raise RuntimeError("setup broke")
        self.ticks = 0
        self.torn_down = False

    async def run(self) -> None:
        while not await self.sleep(0.01):
            self.ticks += 1
            if self.fail_in == "run" and self.ticks == 3:
                raise RuntimeError("run broke")

    async def teardown(self) -> None:
        self.torn_down = True
        await self.publish("findings.periodic", {"final": True})
        if self.fail_in == "teardown":
            raise RuntimeError("teardown broke")


def make(fail_in: str = "", **env: str) -> tuple[Periodic, MemoryTransport]:
    transport = MemoryTransport()
    agent = Periodic(AgentContext.from_env({"AGENT_HEARTBEAT_INTERVAL": "0.02", **env}), transport)
    agent.fail_in = fail_in
    return agent, transport


def statuses(transport: MemoryTransport) -> list[str]:
    beats = [data for subject, data in transport.published if subject.endswith(".status")]
    return [json.loads(data)["status"] for data in beats]


async def test_serve_heartbeats_until_stopped_then_exits_0() -> None:
    agent, transport = make()
    serving = asyncio.create_task(agent.serve())
    await asyncio.sleep(0.15)
    agent.request_stop("test")
    assert await asyncio.wait_for(serving, 5) == 0
    beats = statuses(transport)
    assert len(beats) >= 3  # one at start (on connect), then every 0.02 s
    assert beats[-1] == "stopped" and set(beats[:-1]) == {"running"}
    assert agent.ticks > 0 and agent.torn_down
    # teardown could still publish: it runs before the connection closes.
    assert ("findings.periodic", b'{"final":true}') in transport.published
    assert not transport.connected and not transport.subscriptions


@pytest.mark.parametrize(("fail_in", "code"), [("setup", 1), ("run", 1), ("teardown", 1)])
async def test_serve_exit_codes_on_failure(fail_in: str, code: int) -> None:
    agent, _ = make(fail_in)
    serving = asyncio.create_task(agent.serve())
    await asyncio.sleep(0.1)
    agent.request_stop("test")  # teardown only runs on a stop; run and setup fail by themselves
    assert await asyncio.wait_for(serving, 5) == code


async def test_serve_exits_2_on_bad_configuration() -> None:
    class Strict(Agent):
        async def setup(self) -> None:
            self.setting("STRICT_LEVEL", 1)

    agent = Strict(AgentContext.from_env({"STRICT_LEVEL": "high"}), MemoryTransport())
    assert await asyncio.wait_for(agent.serve(), 5) == 2


async def test_a_run_that_returns_stops_the_agent_cleanly() -> None:
    class OneShot(Agent):
        async def run(self) -> None:
            await self.publish("findings.once", {"done": True})

    transport = MemoryTransport()
    agent = OneShot(AgentContext.from_env({}), transport)
    assert await asyncio.wait_for(agent.serve(), 5) == 0
    assert ("findings.once", b'{"done":true}') in transport.published


async def test_request_stop_with_an_exit_code() -> None:
    agent, _ = make()
    serving = asyncio.create_task(agent.serve())
    await asyncio.sleep(0.05)
    agent.request_stop("lost the device inventory", exit_code=1)
    assert await asyncio.wait_for(serving, 5) == 1


async def test_a_run_loop_ignoring_stop_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("opmas_agent._agent.RUN_GRACE", 0.05)

    class Stubborn(Agent):
        async def run(self) -> None:
            await asyncio.sleep(3600)

    agent = Stubborn(AgentContext.from_env({}), MemoryTransport())
    serving = asyncio.create_task(agent.serve())
    await asyncio.sleep(0.05)
    agent.request_stop()
    assert await asyncio.wait_for(serving, 5) == 0


async def test_harness_can_run_the_loop() -> None:
    async with AgentHarness(Periodic, run_loop=True) as harness:
        await asyncio.sleep(0.1)
        assert harness.agent.ticks > 0
    assert harness.exit_code == 0 and harness.agent.torn_down


# -- small pieces ---------------------------------------------------------------------------------


def test_timestamps_are_rfc3339_utc() -> None:
    assert timestamp(datetime(2026, 11, 24, 7, 54, 47, 123456, tzinfo=UTC)) == "2026-11-24T07:54:47.123Z"
    plus_two = timezone(timedelta(hours=2))
    assert timestamp(datetime(2026, 11, 24, 9, 0, tzinfo=plus_two)) == "2026-11-24T07:00:00.000Z"
    assert timestamp(datetime(2026, 11, 24, 7, 0)) == "2026-11-24T07:00:00.000Z"  # naive = UTC
    assert RFC3339_UTC.match(timestamp())
    assert parse_timestamp("2026-11-24T07:54:47Z") == datetime(2026, 11, 24, 7, 54, 47, tzinfo=UTC)
    assert parse_timestamp("2026-11-24T08:54:47+01:00") == datetime(2026, 11, 24, 7, 54, 47, tzinfo=UTC)
    assert parse_timestamp("2026-11-24T07:54:47").tzinfo is UTC
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("logs.>", "logs.rtr-1", True),
        ("logs.>", "logs.a.b", True),
        ("logs.>", "logs", False),
        ("logs.*", "logs.a", True),
        ("logs.*", "logs.a.b", False),
        ("agent.*.command", "agent.x.command", True),
        ("agent.x.command", "agent.x.query", False),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches
