"""A minimal SDK agent: consumes a subject, keeps a metric, answers a custom command.

The SDK already does heartbeats (`agent.<id>.status`), metrics (`agent.<id>.metrics`), the `ping`,
`status` and `config` commands, reconnecting to NATS and the clean SIGTERM exit.
Keep detection logic in a plain module of its own, so it is unit-tested without any bus.
"""

from __future__ import annotations

from typing import Any

from opmas_agent import Agent, command, timestamp


class MyAgent(Agent):
    default_id = "my-agent"

    async def setup(self) -> None:
        # Settings come from the manifest's `environment`; a bad value stops the agent (exit 2).
        self.interval = self.setting("MY_AGENT_INTERVAL", 30.0)
        self.seen = 0
        await self.subscribe("logs.>", self.on_record)

    async def on_record(self, subject: str, record: dict[str, Any]) -> None:
        self.seen += 1
        self.metrics["records_seen"] = self.seen

    async def run(self) -> None:
        # `sleep` returns True once a stop was requested, so the loop ends promptly on SIGTERM.
        while not await self.sleep(self.interval):
            finding = {"finding": "tick", "seen": self.seen, "timestamp": timestamp()}
            await self.publish("findings.my-agent", finding)

    @command
    def reset(self, params: dict[str, Any]) -> dict[str, int]:
        """`reset`: zero the counter; returns what it was."""
        before, self.seen = self.seen, 0
        self.metrics["records_seen"] = 0
        return {"was": before}
