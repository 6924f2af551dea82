"""What agents and the manager tell each other, as plain values (DESIGN §5, decoded).

The bus turns NATS JSON into these and back; the manager and the api see only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


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
