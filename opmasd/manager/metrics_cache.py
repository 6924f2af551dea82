"""The last metrics each agent reported on agent.metrics, kept in memory since the daemon started."""

from __future__ import annotations

from opmasd.core.messages import MetricsReport
from opmasd.manager.registry import AgentRegistry


class MetricsCache:
    def __init__(self, registry: AgentRegistry) -> None:
        self._registry = registry
        self._reports: dict[str, MetricsReport] = {}

    def on_metrics(self, report: MetricsReport) -> None:
        # Only known agents: an unknown sender must not grow this without bound.
        if self._registry.get(report.agent_id) is not None:
            self._reports[report.agent_id] = report

    def last(self, agent_id: str) -> MetricsReport | None:
        return self._reports.get(agent_id)

    def forget(self, agent_id: str) -> None:
        self._reports.pop(agent_id, None)
