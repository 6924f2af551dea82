"""Unit tests without NATS: `PYTHONPATH=<this folder>:<checkout>/agents pytest test_my_agent.py`."""

from __future__ import annotations

from my_agent.agent import MyAgent
from opmas_agent.testing import AgentHarness


async def test_counts_records_and_resets() -> None:
    async with AgentHarness(MyAgent) as harness:
        await harness.deliver("logs.rtr-1", {"device": "rtr-1", "message": "hello"})
        assert (await harness.command("reset"))["result"] == {"was": 1}
        assert (await harness.command("ping"))["result"] == "pong"
