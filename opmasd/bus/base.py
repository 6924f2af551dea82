"""The interface between the manager and the message bus (DESIGN §5), in domain terms.

The manager receives heartbeats and metrics as plain values and asks agents for things
without knowing NATS subjects or JSON; bus/ does the wire work. opmasd/testing has an
in-memory implementation for the manager's unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from opmasd.core.messages import CommandReply, Heartbeat, MetricsReport

HeartbeatHandler = Callable[[Heartbeat], None]
MetricsHandler = Callable[[MetricsReport], None]


class AgentBus(Protocol):
    @property
    def agent_url(self) -> str:
        """The URL agents connect to (their NATS_URL), credentials excluded."""

    @property
    def is_connected(self) -> bool:
        """Whether messages can flow now (False while NATS is down or reconnecting)."""

    def set_handlers(self, heartbeat: HeartbeatHandler, metrics: MetricsHandler) -> None:
        """Where valid agent.status / agent.metrics messages go; called on the event loop."""

    async def command_agent(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float
    ) -> CommandReply:
        """Request/reply on agent.{agent_id}.command. Raises BusTimeout, BusUnavailable."""
