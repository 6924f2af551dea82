"""The plain values the manager's operations take and return (filters, results, reports)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from opmasd.core.labels import Selector
from opmasd.core.model import AgentRecord, AgentState
from opmasd.manager.packages.manifest import ManifestError


@dataclass(frozen=True)
class AgentFilter:
    state: AgentState | None = None
    type: str = ""
    node: str = ""
    labels: Selector = Selector()

    def matches(self, rec: AgentRecord) -> bool:
        return (
            (self.state is None or rec.state is self.state)
            and (not self.type or rec.spec.type == self.type)
            and (not self.node or rec.node == self.node)
            and (not self.labels or self.labels.matches(rec.spec.label_map))
        )


@dataclass(frozen=True)
class OperationResult:
    """What start, stop or restart did: the agent afterwards, whether anything changed, and why."""

    record: AgentRecord
    changed: bool
    message: str
    # A start whose process is still in its start window: resolves to None once it counts as
    # started, or to why it did not (Supervisor.settled waits for it, outside the agent's lock).
    pending: asyncio.Future[str | None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DiscoveredAgent:
    agent_id: str
    name: str
    manifest_path: str
    new: bool


@dataclass
class DiscoveryReport:
    agents: list[DiscoveredAgent] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)


# The filter that matches every agent (the default of list_agents).
ALL_AGENTS = AgentFilter()
