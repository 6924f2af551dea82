"""What agents and the manager tell each other, as plain values (DESIGN §5, decoded).

The bus turns NATS JSON into these and back; the manager and the api see only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opmasd.core.errors import FieldViolation


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
    """An agent's answer on agent.{id}.command: status is SUCCESS or ERROR."""

    status: str
    result: Any = None
    error: str = ""


# -- the manager's own subjects ({p}.manager.command / .query) ----------------------------------

# A §5 response's status, and an agent's CommandReply.status: one of these two.
SUCCESS = "success"
ERROR = "error"


@dataclass(frozen=True)
class ManagerRequest:
    """One §5 command sent to the manager, decoded: which command, for which agent, with what."""

    command: str
    agent_id: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    # It came on the query subject, which takes only the commands that change nothing.
    read_only: bool = False
    # Its "Authorization" header ("Bearer <token>"; "" when it had none).
    authorization: str = field(default="", repr=False)


@dataclass(frozen=True)
class ManagerReply:
    """The manager's answer to a ManagerRequest, before the bus writes it as a §5 response."""

    status: str  # SUCCESS or ERROR
    command: str = ""
    agent_id: str = ""
    result: Any = None  # JSON-able
    error: str = ""
    # On errors, machine-readable: a gRPC code name ("NOT_FOUND") or "AGENT_ERROR".
    code: str = ""
    # INVALID_ARGUMENT: each bad field (None: the response has no "violations" at all).
    violations: tuple[FieldViolation, ...] | None = None
    # NOT_FOUND / ALREADY_EXISTS: (resource type, name) of what was looked for.
    resource: tuple[str, str] | None = None
    # The request itself was wrong, not the manager's verdict on it: the bus counts it as
    # malformed input (and logs it boundedly) as it does undecodable requests.
    malformed: bool = False
