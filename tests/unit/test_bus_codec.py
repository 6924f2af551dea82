"""The §5 JSON codecs, the subject scheme and the burst log: strict, exact, bounded."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from structlog.testing import capture_logs

from opmasd.bus import codec
from opmasd.bus.burst import BurstLog
from opmasd.bus.connection import NatsBus
from opmasd.bus.subjects import Subjects
from opmasd.core.clock import rfc3339
from opmasd.core.messages import Heartbeat, MetricsReport
from opmasd.core.urls import without_credentials


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_heartbeat_round_trip_and_timestamp_forms() -> None:
    hb = codec.decode_heartbeat(
        j(
            {
                "agent_id": "a1",
                "status": "running",
                "timestamp": "2026-11-24T07:54:47.123Z",
                "metadata": {"x": 1},
            }
        )
    )
    assert hb == Heartbeat("a1", "running", datetime(2026, 11, 24, 7, 54, 47, 123000, UTC), {"x": 1})
    offset = codec.decode_heartbeat(
        j({"agent_id": "a1", "status": "ok", "timestamp": "2026-11-24T09:54:47+02:00"})
    )
    assert offset.timestamp == datetime(2026, 11, 24, 7, 54, 47, tzinfo=UTC)
    assert offset.timestamp.tzinfo is UTC and offset.metadata == {}
    before = datetime.now(UTC)
    missing = codec.decode_heartbeat(j({"agent_id": "a1", "status": "ok"}))
    assert before <= missing.timestamp <= datetime.now(UTC)
    assert codec.decode_heartbeat(codec.encode_heartbeat(hb)) == hb


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    local = datetime(2026, 11, 24, 8, 54, 47, 123456, timezone(timedelta(hours=1)))
    assert rfc3339(local) == "2026-11-24T07:54:47.123Z"
    body = json.loads(codec.encode_command("status", "a1", {"k": 1}, now=local))
    assert body == {
        "command": "status",
        "agent_id": "a1",
        "params": {"k": 1},
        "timestamp": "2026-11-24T07:54:47.123Z",
    }


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not JSON"),
        (b"hello", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b'{"agent_id": NaN}', "not JSON"),
        (b"[1, 2]", "not a JSON object: got an array"),
        (j({"status": "ok"}), "agent_id: missing"),
        (j({"agent_id": "", "status": "ok"}), "agent_id: must not be empty"),
        (j({"agent_id": 7, "status": "ok"}), "agent_id: must be a string, got a number"),
        (j({"agent_id": "a", "status": True}), "status: must be a string, got a boolean"),
        (j({"agent_id": "a", "status": "ok", "metadata": []}), "metadata: must be an object, got an array"),
        (
            j({"agent_id": "a", "status": "ok", "timestamp": 1700000000}),
            "timestamp: must be an RFC 3339 string",
        ),
        (j({"agent_id": "a", "status": "ok", "timestamp": "2026-11-24T07:54:47"}), "is not RFC 3339"),
        (j({"agent_id": "a", "status": "ok", "timestamp": "2026-13-24T07:54:47Z"}), "is not a valid time"),
        (j({"agent_id": "a" * 300, "status": "ok"}), "agent_id: longer than 255"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_malformed_heartbeats_say_what_is_wrong(payload: bytes, reason: str) -> None:
    with pytest.raises(codec.MalformedMessage) as err:
        codec.decode_heartbeat(payload)
    assert reason in err.value.reason


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"])
def test_times_beyond_what_utc_can_hold_are_malformed(timestamp: str) -> None:
    payload = json.dumps({"agent_id": "a", "status": "running", "timestamp": timestamp}).encode()
    with pytest.raises(codec.MalformedMessage, match="is out of range"):
        codec.decode_heartbeat(payload)


def test_nesting_is_bounded() -> None:
    deep: object = 1
    for _ in range(codec.MAX_DEPTH):  # the envelope is one level more
        deep = {"a": deep}
    with pytest.raises(codec.MalformedMessage, match="nested deeper than 32 levels"):
        codec.decode_metrics(json.dumps({"agent_id": "a", "metrics": deep}).encode())
    codec.decode_metrics(json.dumps({"agent_id": "a", "metrics": deep["a"]}).encode())  # type: ignore[index]


def test_size_is_checked_before_parsing() -> None:
    big = b'{"agent_id": "a", "status": "ok", "pad": "' + b"x" * codec.MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(
        codec.MalformedMessage, match=rf"message too large \({len(big)} bytes, limit 262144\)"
    ):
        codec.decode_heartbeat(big)


def test_metrics() -> None:
    report = codec.decode_metrics(
        j({"agent_id": "a1", "timestamp": "2026-11-24T07:54:47Z", "metrics": {"cpu": 1.5}})
    )
    assert report == MetricsReport("a1", datetime(2026, 11, 24, 7, 54, 47, tzinfo=UTC), {"cpu": 1.5})
    assert codec.decode_metrics(codec.encode_metrics(report)) == report
    for bad, reason in [
        ({"agent_id": "a1"}, "metrics: missing"),
        ({"agent_id": "a1", "metrics": 3}, "metrics: must be an object, got a number"),
    ]:
        with pytest.raises(codec.MalformedMessage, match=reason):
            codec.decode_metrics(j(bad))


def test_commands_and_responses() -> None:
    cmd = codec.decode_command(j({"command": "ping"}))
    assert (cmd.command, cmd.agent_id, dict(cmd.params), cmd.timestamp) == ("ping", "", {}, None)
    with pytest.raises(codec.MalformedMessage, match="command: missing"):
        codec.decode_command(j({"agent_id": "a"}))
    with pytest.raises(codec.MalformedMessage, match="params: must be an object"):
        codec.decode_command(j({"command": "x", "params": "y"}))

    ok = json.loads(codec.encode_response("success", "ping", "a1", {"pong": True}))
    assert ok["status"] == "success" and ok["result"] == {"pong": True} and ok["error"] is None
    assert ok["timestamp"].endswith("Z") and "code" not in ok
    err = json.loads(codec.encode_response("error", "x", "a1", error="boom", code="NOT_FOUND"))
    assert err["error"] == "boom" and err["code"] == "NOT_FOUND"

    reply = codec.decode_response(codec.encode_response("success", "ping", "a1", [1, 2])).to_reply()
    assert (reply.status, reply.result, reply.error) == ("success", [1, 2], "")
    assert codec.decode_response(j({"status": "error"})).error  # an error always has a message
    with pytest.raises(codec.MalformedMessage, match="status: must be 'success' or 'error'"):
        codec.decode_response(j({"status": "fine"}))
    with pytest.raises(ValueError):
        codec.encode_response("maybe")
    with pytest.raises(ValueError):
        codec.encode_command("x", params={"nan": float("nan")})


def test_subjects_follow_the_prefix_and_refuse_unsafe_ids() -> None:
    s = Subjects()
    assert (s.manager_command, s.manager_query, s.manager_response) == (
        "agent.manager.command",
        "agent.manager.query",
        "agent.manager.response",
    )
    assert (s.status, s.metrics) == ("agent.status", "agent.metrics")
    assert (s.agent_command("a1"), s.agent_query("a1"), s.agent_response("a1")) == (
        "agent.a1.command",
        "agent.a1.query",
        "agent.a1.response",
    )
    assert Subjects("site1.opmas").agent_command("x-y") == "site1.opmas.x-y.command"
    # The agent-id grammar (core.ids) holds here too: no dots, no reserved first token.
    for bad_id in ("", "a*", "a>b", "a b", "a..b", "x.y", "manager", "status", "node.n1", "A1"):
        with pytest.raises(ValueError):
            s.agent_command(bad_id)
    for bad_prefix in ("", "a.", "a b", "*", "x.>"):
        with pytest.raises(ValueError):
            Subjects(bad_prefix)


def test_agent_url_carries_no_credentials() -> None:
    assert without_credentials("nats://u:secret@10.0.0.1:4222") == "nats://10.0.0.1:4222"
    assert without_credentials("tls://u:p@a:1, nats://b:2") == "tls://a:1,nats://b:2"
    assert without_credentials("localhost:4222") == "nats://localhost:4222"


@pytest.mark.parametrize("url", ["", "http://x:4222", "nats://", "nats://host:port", "nats://a:1,,ftp://b"])
def test_bad_urls_are_refused_up_front(url: str) -> None:
    with pytest.raises(ValueError):
        NatsBus(url)


def test_burst_log_logs_first_then_one_summary() -> None:
    burst = BurstLog("malformed message", window=60)
    with capture_logs() as logs:
        for i in range(1000):
            burst.record("agent.status", f"reason {i}")
        burst.record("agent.metrics", "other")
        burst.close()
    assert burst.counts() == {"agent.status": 1000, "agent.metrics": 1}
    assert [(e["event"], e["key"]) for e in logs] == [
        ("malformed message", "agent.status"),
        ("malformed message", "agent.metrics"),
        ("malformed message (repeated)", "agent.status"),
    ]
    assert logs[2]["more"] == 999 and logs[2]["last_reason"] == "reason 999"


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"9" * 40, b"-" + b"9" * 40])
def test_numbers_no_api_message_can_hold_are_malformed(number: bytes) -> None:
    # An agent's metrics end up in a Struct (a double) and in int64 fields: refused at intake,
    # they cannot break GetAgentMetrics later.
    with pytest.raises(codec.MalformedMessage, match="out of range"):
        codec.decode_metrics(b'{"agent_id": "a1", "metrics": {"x": ' + number + b"}}")
