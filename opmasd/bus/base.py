"""The interface between the manager and the message bus (DESIGN §5), in domain terms.

The manager receives heartbeats and metrics as plain values and asks agents for things
without knowing NATS subjects or JSON; bus/ does the wire work. opmasd/testing has an
in-memory implementation for the manager's unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class Heartbeat:
    """One message on agent.status: the agent says it is alive (and how it is)."""

    agent_id: str
    # What the agent reports about itself ("running", "degraded", ...): informational.
    status: str
    timestamp: datetime
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsReport:
    """One message on agent.metrics."""

    agent_id: str
    timestamp: datetime
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandReply:
    """An agent's answer on agent.{id}.command: status is "success" or "error"."""

    status: str
    result: Any = None
    error: str = ""


class BusTimeout(Exception):
    """Nobody answered a request within its timeout."""


class BusUnavailable(Exception):
    """The bus is not connected (server down, reconnecting)."""


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
