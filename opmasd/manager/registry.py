"""The manager's memory of every agent, written through to the store, with events out.

Reads are served from memory (fast, and available while the database is away). Every change
is saved; a save that fails is logged, kept, and retried by `flush_pending`, so a database
outage never stops supervision and loses no transition once the database is back.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog

from opmasd.manager.events import AgentEvent, EventHub
from opmasd.manager.model import AgentRecord, AgentState, Transition, utcnow
from opmasd.store.base import AgentStore, StoreError

log = structlog.get_logger(__name__)


class AgentRegistry:
    def __init__(self, store: AgentStore, hub: EventHub) -> None:
        self._store = store
        self._hub = hub
        self._records: dict[str, AgentRecord] = {}
        # Writes that failed, in order: (snapshot, transition or None for a plain save).
        self._pending: list[tuple[AgentRecord, Transition | None]] = []

    def load(self) -> None:
        self._records = {rec.agent_id: rec for rec in self._store.load_agents()}

    def get(self, agent_id: str) -> AgentRecord | None:
        """The live (not deleted) agent, or None."""
        rec = self._records.get(agent_id)
        return None if rec is None or rec.deleted else rec

    def get_any(self, agent_id: str) -> AgentRecord | None:
        """The agent, deleted ones (tombstones) included."""
        return self._records.get(agent_id)

    def live(self) -> Iterator[AgentRecord]:
        return (rec for rec in self._records.values() if not rec.deleted)

    def __len__(self) -> int:
        return sum(1 for _ in self.live())

    def save(self, rec: AgentRecord) -> None:
        rec.updated_at = utcnow()
        self._records[rec.agent_id] = rec
        self._write(rec.copy(), None)

    def transition(self, rec: AgentRecord, state: AgentState, reason: str) -> Transition:
        """Move rec to state, store the change with its reason, and announce it."""
        now = utcnow()
        transition = Transition(rec.agent_id, rec.state, state, reason, now)
        rec.state = state
        rec.state_reason = reason
        rec.state_changed_at = now
        rec.updated_at = now
        self._records[rec.agent_id] = rec
        snapshot = rec.copy()
        self._write(snapshot, transition)
        log.info(
            "agent state changed",
            agent_id=rec.agent_id,
            previous=transition.previous.value,
            state=state.value,
            reason=reason,
        )
        self._hub.publish(AgentEvent(transition, snapshot))
        return transition

    def _write(self, snapshot: AgentRecord, transition: Transition | None) -> None:
        if self._pending:
            # Keep the order: nothing overtakes a write that is still waiting.
            self._pending.append((snapshot, transition))
            return
        try:
            self._apply(snapshot, transition)
        except StoreError as exc:
            log.error("store write failed; will retry", agent_id=snapshot.agent_id, error=str(exc))
            self._pending.append((snapshot, transition))

    def _apply(self, snapshot: AgentRecord, transition: Transition | None) -> None:
        if transition is None:
            self._store.save_agent(snapshot)
        else:
            self._store.record_transition(snapshot, transition)

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    def flush_pending(self) -> None:
        """Retry the writes that failed, oldest first; stop at the first that fails again."""
        if not self._pending:
            return
        while self._pending:
            snapshot, transition = self._pending[0]
            try:
                self._apply(snapshot, transition)
            except StoreError as exc:
                log.warning("store still failing", pending=len(self._pending), error=str(exc))
                return
            self._pending.pop(0)
        log.info("store writes caught up")
