"""sysmon on the SDK: samples become metrics and JSON lines; `sample` answers on demand."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agents" / "packages" / "sysmon"))

from opmas_agent import ConfigError
from opmas_agent.testing import AgentHarness
from sysmon_agent import Sysmon


async def test_sample_command_prints_a_line_and_sets_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    async with AgentHarness(Sysmon, env={"AGENT_ID": "sysmon"}) as harness:
        reply = await harness.command("sample")
        assert reply["status"] == "success"
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line == reply["result"]
        assert line["agent_id"] == "sysmon" and len(line["load"]) == 3
        assert line["memory_total"] > 0 and line["disk_total"] > 0
        await harness.heartbeat()
        [metrics] = harness.published_on("agent.*.metrics")
        values = metrics["metrics"]
        assert values["memory_total_bytes"] == line["memory_total"]
        assert {"load1", "load5", "load15", "disk_free_bytes", "memory_available_bytes"} <= set(values)


async def test_run_loop_samples_at_start() -> None:
    async with AgentHarness(Sysmon, env={"SYSMON_INTERVAL": "3600"}, run_loop=True) as harness:
        for _ in range(100):
            if harness.agent.metrics:
                break
            await asyncio.sleep(0.01)
        assert "load1" in harness.agent.metrics
    assert harness.exit_code == 0


async def test_bad_interval() -> None:
    with pytest.raises(ConfigError):
        async with AgentHarness(Sysmon, env={"SYSMON_INTERVAL": "0"}):
            pass
