"""opmas_agent: the SDK for OPMAS agents.

An agent is a subclass of `Agent` started with `run`:

    from typing import Any
    from opmas_agent import Agent, command, run

    class Echo(Agent):
        default_id = "echo"

        async def setup(self) -> None:
            self.limit = self.setting("ECHO_LIMIT", 10)
            await self.subscribe("logs.>", self.on_log)

        async def on_log(self, subject: str, record: dict[str, Any]) -> None:
            self.metrics["seen"] = self.metrics.get("seen", 0) + 1

        @command
        def hello(self, params: dict[str, Any]) -> str:
            return f"hello {params.get('name', 'world')}"

    if __name__ == "__main__":
        run(Echo)

The SDK honours the NATS contract (DESIGN §5) — heartbeats on `{prefix}.{agent_id}.status`,
metrics on `{prefix}.{agent_id}.metrics`, commands on `{prefix}.{agent_id}.command|query` with
the built-ins `ping`, `status` and `config` — and stops gracefully on SIGTERM.
`opmas_agent.testing.AgentHarness` runs an agent without NATS, for unit tests.
"""

from __future__ import annotations

from ._agent import SDK_VERSION as __version__
from ._agent import Agent
from ._commands import CommandError, command
from ._context import AgentContext, ConfigError
from ._runner import run
from ._time import parse_timestamp, timestamp

__all__ = [
    "Agent",
    "AgentContext",
    "CommandError",
    "ConfigError",
    "__version__",
    "command",
    "parse_timestamp",
    "run",
    "timestamp",
]
