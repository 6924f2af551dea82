"""The manager's in-memory registry of agents: every record, every state transition, events out.

Reads are served from memory (fast, and available while the database is away). Each change is
handed to the write-behind persistence (manager.persistence) and each transition announced
on the event hub (manager.events) as it happens.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog

from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.model import AgentRecord, AgentSpec, AgentState, Transition
from opmasd.manager.events import AgentEvent, EventHub
from opmasd.manager.persistence import WriteBehind

log = structlog.get_logger(__name__)


class AgentRegistry:
    def __init__(self, writes: WriteBehind, hub: EventHub, clock: Clock = SYSTEM_CLOCK) -> None:
        self._writes = writes
        self._hub = hub
        self._clock = clock
        self._records: dict[str, AgentRecord] = {}

    def load(self, records: list[AgentRecord]) -> None:
        self._records = {rec.agent_id: rec for rec in records}

    def get(self, agent_id: str) -> AgentRecord | None:
        """The live (not deleted) agent, or None."""
        rec = self._records.get(agent_id)
        return None if rec is None or rec.deleted else rec

    def get_any(self, agent_id: str) -> AgentRecord | None:
        """The agent, deleted ones (tombstones) included."""
        return self._records.get(agent_id)

    def spec_of(self, agent_id: str) -> AgentSpec | None:
        rec = self._records.get(agent_id)
        return None if rec is None else rec.spec

    def live(self) -> Iterator[AgentRecord]:
        return (rec for rec in self._records.values() if not rec.deleted)

    def restore(self, agent_id: str, rec: AgentRecord | None) -> None:
        """Put back in memory what the store holds for agent_id (None: nothing), writing nothing."""
        if rec is None:
            self._records.pop(agent_id, None)
        else:
            self._records[agent_id] = rec

    def save(self, rec: AgentRecord) -> None:
        rec.updated_at = self._clock.now()
        self._records[rec.agent_id] = rec
        self._writes.write(rec.copy(), None)

    def announce_deletion(self, rec: AgentRecord, reason: str) -> None:
        """Tell watchers the agent is gone: its last event (nothing is stored: the row is the
        tombstone already written)."""
        event = Transition(rec.agent_id, rec.state, rec.state, reason, self._clock.now())
        self._hub.publish(AgentEvent(event, rec.copy(), deleted=True))

    def transition(self, rec: AgentRecord, state: AgentState, reason: str) -> Transition:
        """Move rec to state, store the change with its reason, and announce it."""
        now = self._clock.now()
        transition = Transition(rec.agent_id, rec.state, state, reason, now)
        rec.state = state
        rec.state_reason = reason
        rec.state_changed_at = now
        rec.updated_at = now
        self._records[rec.agent_id] = rec
        snapshot = rec.copy()
        self._writes.write(snapshot, transition)
        log.info(
            "agent state changed",
            agent_id=rec.agent_id,
            previous=transition.previous.value,
            state=state.value,
            reason=reason,
        )
        self._hub.publish(AgentEvent(transition, snapshot))
        return transition
