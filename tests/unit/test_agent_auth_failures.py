"""auth-failures: the detector as plain logic, then the agent through the SDK's harness."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents" / "packages" / "auth-failures"))

from auth_failures.agent import AuthFailuresAgent
from auth_failures.detector import AuthFailureDetector
from opmas_agent import ConfigError
from opmas_agent.testing import AgentHarness

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = ROOT / "agents" / "samples" / "device-logs.jsonl"
T0 = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)


def failure(
    seconds: float, device: str = "edge-rtr-1", client: str = "203.0.113.7", user: str = "admin"
) -> dict[str, Any]:
    return {
        "timestamp": (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z"),
        "device": device,
        "host": "10.0.0.1",
        "program": "sshd",
        "event": "auth_failure",
        "client": client,
        "user": user,
        "message": f"Failed password for {user} from {client} port 22 ssh2",
    }


def feed(detector: AuthFailureDetector, records: list[dict[str, Any]]) -> list[Any]:
    return [f for f in (detector.observe(r) for r in records) if f is not None]


# -- detection --------------------------------------------------------------------------------------


def test_threshold_crossing_makes_one_finding() -> None:
    detector = AuthFailureDetector(threshold=5, window=60)
    users = ["admin", "root", "admin", "cisco", "ubnt"]
    findings = [detector.observe(failure(i * 10, user=u)) for i, u in enumerate(users)]
    assert findings[:4] == [None] * 4
    finding = findings[4]
    assert finding is not None
    assert (finding.device, finding.client, finding.count) == ("edge-rtr-1", "203.0.113.7", 5)
    assert finding.first_seen == T0 and finding.last_seen == T0 + timedelta(seconds=40)
    assert finding.users == ("admin", "root", "cisco", "ubnt")
    payload = finding.payload()
    assert payload == {
        "finding": "auth_failures",
        "severity": "high",
        "device": "edge-rtr-1",
        "client": "203.0.113.7",
        "count": 5,
        "window_seconds": 60,
        "first_seen": "2026-03-14T09:00:00.000Z",
        "last_seen": "2026-03-14T09:00:40.000Z",
        "users": ["admin", "root", "cisco", "ubnt"],
        "host": "10.0.0.1",
    }


def test_failures_spread_wider_than_the_window_never_alert() -> None:
    detector = AuthFailureDetector(threshold=5, window=60)
    # One every 20 s: at most 3 inside any 60 s window (a failure exactly 60 s old has left it).
    assert feed(detector, [failure(i * 20) for i in range(20)]) == []


def test_window_expiry_then_a_new_burst() -> None:
    detector = AuthFailureDetector(threshold=3, window=60)
    assert feed(detector, [failure(0), failure(1)]) == []
    # 100 s later the first two have left the window: it takes three new ones.
    assert feed(detector, [failure(100), failure(101)]) == []
    [finding] = feed(detector, [failure(102)])
    assert finding.count == 3 and finding.first_seen == T0 + timedelta(seconds=100)


def test_no_duplicate_alert_within_a_window_then_at_most_one_per_window() -> None:
    detector = AuthFailureDetector(threshold=5, window=60)
    # A sustained attack: one failure every 5 s for 3 minutes.
    findings = feed(detector, [failure(i * 5) for i in range(37)])
    assert [f.last_seen - T0 for f in findings] == [timedelta(seconds=s) for s in (20, 80, 140)]
    assert all(f.count == 12 for f in findings[1:])  # a full window's worth each time


def test_pairs_are_counted_separately() -> None:
    detector = AuthFailureDetector(threshold=3, window=60)
    records = [
        failure(0, device="edge-rtr-1", client="203.0.113.7"),
        failure(1, device="edge-rtr-2", client="203.0.113.7"),
        failure(2, device="edge-rtr-1", client="198.51.100.9"),
        failure(3, device="edge-rtr-1", client="203.0.113.7"),
        failure(4, device="edge-rtr-2", client="203.0.113.7"),
        failure(5, device="edge-rtr-1", client="198.51.100.9"),
    ]
    assert feed(detector, records) == []
    [finding] = feed(detector, [failure(6, device="edge-rtr-2", client="203.0.113.7")])
    assert (finding.device, finding.client) == ("edge-rtr-2", "203.0.113.7")
    assert detector.tracked == 3


def test_time_comes_from_the_records_not_from_arrival() -> None:
    detector = AuthFailureDetector(threshold=3, window=60)
    # Yesterday's records replayed now, in one go: the window is judged in record time.
    records = [failure(-86400 + i * 40) for i in range(5)]
    assert feed(detector, records) == []
    # Out of order within the window still counts.
    [finding] = feed(detector, [failure(30), failure(10), failure(20)])
    assert finding.first_seen == T0 + timedelta(seconds=10)
    assert finding.last_seen == T0 + timedelta(seconds=30)


def test_arrival_time_stands_in_for_a_missing_timestamp() -> None:
    detector = AuthFailureDetector(threshold=2, window=60)
    record = failure(0)
    del record["timestamp"]
    assert detector.observe(record) is None  # no time at all: skipped
    assert detector.stats.bad_timestamp == 1
    assert detector.observe(record, received_at=T0) is None
    finding = detector.observe({**record, "timestamp": "garbage"}, received_at=T0 + timedelta(seconds=1))
    assert finding is not None and finding.count == 2


def test_other_events_and_incomplete_records_are_ignored() -> None:
    detector = AuthFailureDetector(threshold=1, window=60)
    assert detector.observe({**failure(0), "event": "auth_success"}) is None
    assert detector.observe({**failure(0), "client": None}) is None
    assert detector.observe({k: v for k, v in failure(0).items() if k != "device"}) is None
    assert (detector.stats.records, detector.stats.auth_failures, detector.stats.ignored) == (3, 2, 2)


def test_prune_and_reset_forget_pairs() -> None:
    detector = AuthFailureDetector(threshold=10, window=60)
    feed(detector, [failure(0, client="a"), failure(1, client="b"), failure(100, client="c")])
    assert detector.tracked == 3
    assert detector.prune() == 2  # a and b are out of the window at the newest time seen (100 s)
    feed(detector, [failure(101, device="other", client="c")])
    assert detector.reset(client="c") == 2
    assert detector.tracked == 0


def test_a_flood_is_bounded() -> None:
    detector = AuthFailureDetector(threshold=5, window=3600, max_events=50)
    feed(detector, [failure(i * 0.01) for i in range(500)])
    assert detector.top()[0]["count"] == 50


def test_the_sample_file_holds_exactly_one_brute_force() -> None:
    detector = AuthFailureDetector(threshold=5, window=60)
    records = [json.loads(line) for line in SAMPLES.read_text().splitlines() if line.strip()]
    findings = feed(detector, records)
    assert [(f.device, f.client, f.count) for f in findings] == [("edge-rtr-1", "203.0.113.7", 5)]
    assert detector.stats.auth_failures == 18


# -- the agent --------------------------------------------------------------------------------------


async def test_agent_publishes_findings_on_findings_auth() -> None:
    env = {"AUTH_FAIL_THRESHOLD": "3", "AUTH_FAIL_WINDOW": "30"}
    async with AgentHarness(AuthFailuresAgent, env=env) as harness:
        for i in range(4):
            await harness.deliver("logs.edge-rtr-1", failure(i))
        [finding] = harness.published_on("findings.auth")
        assert finding["finding"] == "auth_failures" and finding["count"] == 3
        assert finding["window_seconds"] == 30.0
        assert finding["agent_id"] == "auth-failures"
        assert finding["timestamp"].endswith("Z")
        await harness.heartbeat()
        [metrics] = harness.published_on("agent.*.metrics")
        assert metrics["metrics"]["findings_published"] == 1
        assert metrics["metrics"]["auth_failures_seen"] == 4


async def test_agent_stats_and_reset_commands() -> None:
    async with AgentHarness(AuthFailuresAgent, env={"AUTH_FAIL_THRESHOLD": "2"}) as harness:
        await harness.deliver("logs.a", failure(0, device="a"))
        await harness.deliver("logs.b", failure(0, device="b"))
        stats = (await harness.command("stats"))["result"]
        assert stats["threshold"] == 2 and stats["window_seconds"] == 60.0
        assert stats["pairs_tracked"] == 2
        assert {entry["device"] for entry in stats["top"]} == {"a", "b"}
        assert (await harness.command("reset", {"device": "a"}))["result"] == {"cleared": 1}
        # Reset means counting starts over: one more failure on "a" is not yet a finding.
        await harness.deliver("logs.a", failure(1, device="a"))
        assert harness.published_on("findings.auth") == []
        assert (await harness.command("reset"))["result"] == {"cleared": 2}
        bad = await harness.command("reset", {"device": 7})
        assert bad["status"] == "error" and bad["error"] == "device must be a string"


@pytest.mark.parametrize(
    "env",
    [{"AUTH_FAIL_THRESHOLD": "0"}, {"AUTH_FAIL_THRESHOLD": "five"}, {"AUTH_FAIL_WINDOW": "-1"}],
)
async def test_agent_rejects_bad_settings(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        async with AgentHarness(AuthFailuresAgent, env=env):
            pass
