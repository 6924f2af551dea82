"""An in-memory AgentBus: the test delivers heartbeats and decides how agents answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from opmasd.bus.base import HeartbeatHandler, MetricsHandler
from opmasd.core.clock import utcnow
from opmasd.core.errors import BusTimeout, BusUnavailable
from opmasd.core.messages import CommandReply, Heartbeat, MetricsReport

Responder = Callable[[str, Mapping[str, Any]], CommandReply]


class FakeBus:
    def __init__(self, agent_url: str = "nats://127.0.0.1:4222") -> None:
        self._agent_url = agent_url
        self._heartbeat: HeartbeatHandler | None = None
        self._metrics: MetricsHandler | None = None
        # agent_id -> how it answers; agents absent here never answer (a timeout).
        self.responders: dict[str, Responder] = {}
        self.connected = True
        self.requests: list[tuple[str, str, Mapping[str, Any], float]] = []

    @property
    def is_connected(self) -> bool:
        return self.connected

    @property
    def agent_url(self) -> str:
        return self._agent_url

    def set_handlers(self, heartbeat: HeartbeatHandler, metrics: MetricsHandler) -> None:
        self._heartbeat, self._metrics = heartbeat, metrics

    def heartbeat(self, agent_id: str, status: str = "running", when: datetime | None = None) -> None:
        assert self._heartbeat is not None, "no heartbeat handler set"
        self._heartbeat(Heartbeat(agent_id, status, when or utcnow(), {}))

    def metrics(self, agent_id: str, values: Mapping[str, Any]) -> None:
        assert self._metrics is not None, "no metrics handler set"
        self._metrics(MetricsReport(agent_id, utcnow(), dict(values)))

    async def command_agent(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float
    ) -> CommandReply:
        self.requests.append((agent_id, command, params, timeout))
        if not self.connected:
            raise BusUnavailable("not connected to NATS")
        responder = self.responders.get(agent_id)
        if responder is None:
            await asyncio.sleep(min(timeout, 0.05))
            raise BusTimeout(f"no reply from {agent_id} within {timeout:g}s")
        return responder(command, params)
