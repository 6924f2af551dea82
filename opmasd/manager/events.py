"""Fan-out of agent state changes to WatchEvents subscribers (and later the NATS bus).

Each subscriber has its own bounded queue: a slow reader loses its oldest events (and is
told how many) rather than slowing the manager or growing memory without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from opmasd.core.model import AgentRecord, Transition

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AgentEvent:
    transition: Transition
    # A snapshot of the agent right after the transition.
    record: AgentRecord
    # The agent was deleted (the transition is then to the state it was left in).
    deleted: bool = False


class Subscription:
    def __init__(self, hub: EventHub, agent_ids: frozenset[str], maxsize: int) -> None:
        self._hub = hub
        self._agent_ids = agent_ids
        self._queue: asyncio.Queue[AgentEvent | None] = asyncio.Queue(maxsize)
        self.dropped = 0

    def wants(self, event: AgentEvent) -> bool:
        return not self._agent_ids or event.transition.agent_id in self._agent_ids

    def offer(self, event: AgentEvent | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            if self.dropped in (1, 100, 10_000):
                log.warning("event subscriber is slow; dropping its oldest events", dropped=self.dropped)
        self._queue.put_nowait(event)

    async def __aiter__(self) -> AsyncIterator[AgentEvent]:
        try:
            while True:
                event = await self._queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._hub.unsubscribe(self)


class EventHub:
    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, agent_ids: frozenset[str] = frozenset()) -> Subscription:
        sub = Subscription(self, agent_ids, self._queue_size)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, event: AgentEvent) -> None:
        for sub in self._subscriptions:
            if sub.wants(event):
                sub.offer(event)

    def close(self) -> None:
        """End every subscription's iteration (daemon shutdown)."""
        for sub in list(self._subscriptions):
            sub.offer(None)
