"""device-liveness: the tracker on an injected clock, then the agent through the SDK's harness."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents" / "packages" / "device-liveness"))

from device_liveness.agent import DeviceLivenessAgent
from device_liveness.tracker import LivenessTracker
from opmas_agent import ConfigError
from opmas_agent.testing import AgentHarness

ROOT = Path(__file__).resolve().parents[2]

T0 = 1_773_478_800.0  # 2026-03-14T09:00:00Z


# -- tracking -------------------------------------------------------------------------------------


def test_silent_once_then_recovered_once() -> None:
    tracker = LivenessTracker(timeout=300)
    tracker.seen("rtr-1", T0, host="10.0.0.1", record_time="2026-03-14T08:59:59Z")
    assert tracker.check(T0 + 300) == []  # exactly the timeout: not yet
    [silent] = tracker.check(T0 + 301)
    assert (silent.finding, silent.device, silent.silent_seconds) == ("device_silent", "rtr-1", 301)
    assert silent.payload() == {
        "finding": "device_silent",
        "severity": "medium",
        "device": "rtr-1",
        "last_seen": "2026-03-14T09:00:00.000Z",
        "silent_seconds": 301,
        "timeout_seconds": 300,
        "host": "10.0.0.1",
        "last_record_time": "2026-03-14T08:59:59Z",
    }
    assert tracker.check(T0 + 900) == []  # reported once, not at every check
    recovered = tracker.seen("rtr-1", T0 + 1000)
    assert recovered is not None
    assert recovered.payload()["finding"] == "device_recovered"
    assert recovered.payload()["severity"] == "info"
    assert recovered.silent_seconds == 1000 and recovered.host == "10.0.0.1"
    assert tracker.seen("rtr-1", T0 + 1001) is None  # talking normally again
    assert tracker.check(T0 + 1200) == []


def test_each_device_has_its_own_clock() -> None:
    tracker = LivenessTracker(timeout=60)
    tracker.seen("a", T0)
    tracker.seen("b", T0 + 50)
    assert [f.device for f in tracker.check(T0 + 61)] == ["a"]
    assert [f.device for f in tracker.check(T0 + 111)] == ["b"]
    assert tracker.silent == 2


def test_a_talking_device_is_never_silent() -> None:
    tracker = LivenessTracker(timeout=10)
    for second in range(0, 100, 5):
        tracker.seen("chatty", T0 + second)
        assert tracker.check(T0 + second + 1) == []


def test_expected_devices_count_from_when_tracking_began() -> None:
    tracker = LivenessTracker(timeout=60)
    tracker.expect("never-talks", T0)
    tracker.expect("talks", T0)
    tracker.seen("talks", T0 + 30)
    [silent] = tracker.check(T0 + 61)
    assert silent.device == "never-talks"


def test_forget_and_listing() -> None:
    tracker = LivenessTracker(timeout=60)
    tracker.seen("a", T0)
    tracker.seen("b", T0 + 30, host="10.0.0.2")
    tracker.check(T0 + 70)
    listing = tracker.devices(T0 + 70)
    assert [(d["device"], d["state"], d["quiet_seconds"]) for d in listing] == [
        ("a", "silent", 70),
        ("b", "alive", 40),
    ]
    assert tracker.forget("a") and not tracker.forget("a")
    assert tracker.tracked == 1


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LivenessTracker(timeout=0)


# -- the agent, on an injected clock ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def test_agent_reports_silent_and_recovered_devices() -> None:
    env = {"LIVENESS_TIMEOUT": "60", "LIVENESS_DEVICES": "core-sw-9"}
    harness = AgentHarness(DeviceLivenessAgent, env=env)
    clock = harness.agent.clock = Clock()
    async with harness:
        await harness.deliver(
            "logs.rtr-1", {"device": "rtr-1", "host": "10.0.0.1", "timestamp": "2026-03-14T09:00:00Z"}
        )
        await harness.deliver("logs.fw-1", {"device": "fw-1"})
        await harness.deliver("logs.x", {"message": "no device field"})
        clock.now += 45
        await harness.deliver("logs.fw-1", {"device": "fw-1"})
        clock.now += 30  # rtr-1 and the expected core-sw-9: 75 s quiet; fw-1: 30 s
        found = await harness.agent.check_now()
        assert sorted(f.device for f in found) == ["core-sw-9", "rtr-1"]
        published = harness.published_on("findings.liveness")
        assert {p["device"] for p in published} == {"core-sw-9", "rtr-1"}
        rtr = next(p for p in published if p["device"] == "rtr-1")
        assert rtr["finding"] == "device_silent" and rtr["severity"] == "medium"
        assert rtr["silent_seconds"] == 75 and rtr["host"] == "10.0.0.1"
        assert rtr["agent_id"] == "device-liveness" and rtr["timestamp"].endswith("Z")
        harness.clear()
        assert await harness.agent.check_now() == []  # no repeats
        clock.now += 5
        await harness.deliver("logs.rtr-1", {"device": "rtr-1"})
        [back] = harness.published_on("findings.liveness")
        assert back["finding"] == "device_recovered" and back["silent_seconds"] == 80
        await harness.heartbeat()
        [metrics] = harness.published_on("agent.*.metrics")
        assert metrics["metrics"]["devices_tracked"] == 3
        assert metrics["metrics"]["devices_silent"] == 1
        assert metrics["metrics"]["records_seen"] == 4


async def test_agent_devices_and_forget_commands() -> None:
    harness = AgentHarness(DeviceLivenessAgent, env={"LIVENESS_TIMEOUT": "60"})
    clock = harness.agent.clock = Clock()
    async with harness:
        await harness.deliver("logs.a", {"device": "a"})
        clock.now += 10
        devices = (await harness.command("devices"))["result"]
        assert [(d["device"], d["state"], d["quiet_seconds"]) for d in devices] == [("a", "alive", 10)]
        assert (await harness.command("forget", {"device": "a"}))["result"] == {"forgotten": "a"}
        missing = await harness.command("forget", {"device": "a"})
        assert missing["status"] == "error" and "not tracked" in missing["error"]
        assert (await harness.command("forget"))["error"] == "params.device: required"


async def test_agent_checks_on_its_own_loop() -> None:
    env = {"LIVENESS_TIMEOUT": "60", "LIVENESS_CHECK_INTERVAL": "0.01"}
    harness = AgentHarness(DeviceLivenessAgent, env=env, run_loop=True)
    clock = harness.agent.clock = Clock()
    async with harness:
        await harness.deliver("logs.a", {"device": "a"})
        clock.now += 61
        for _ in range(100):
            if harness.published_on("findings.liveness"):
                break
            await asyncio.sleep(0.01)
        assert [p["device"] for p in harness.published_on("findings.liveness")] == ["a"]


@pytest.mark.parametrize("env", [{"LIVENESS_TIMEOUT": "0"}, {"LIVENESS_CHECK_INTERVAL": "soon"}])
async def test_agent_rejects_bad_settings(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        async with AgentHarness(DeviceLivenessAgent, env=env):
            pass
