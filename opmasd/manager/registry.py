"""The manager's memory of every agent, written through to the store, with events out.

Reads are served from memory (fast, and available while the database is away). Every change
is queued for the store and the queue is written in one transaction at the next turn of the
event loop, so a burst of changes (200 agents stopped at once) costs one commit, not 400;
operations that answer an operator wait for that commit (`durable`) before they answer.
A write that fails is logged, kept, and retried by `flush`, so a database outage never stops
supervision and loses no transition once the database is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import structlog

from opmasd.core.clock import utcnow
from opmasd.core.errors import StoreError
from opmasd.core.model import AgentRecord, AgentState, Transition
from opmasd.manager.events import AgentEvent, EventHub
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)


class AgentRegistry:
    def __init__(self, store: AgentStore, hub: EventHub) -> None:
        self._store = store
        self._hub = hub
        self._records: dict[str, AgentRecord] = {}
        # Writes not yet in the store, in order: (snapshot, transition or None for a plain save).
        self._queue: list[tuple[AgentRecord, Transition | None]] = []
        self._flush_scheduled = False
        # Whether the last attempt failed: the queue then waits for the next flush() (retry).
        self._failing = False
        self._durable_waiters: list[asyncio.Future[None]] = []

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
        self._queue.append((snapshot, transition))
        if self._flush_scheduled or self._failing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (start-up, tests): write at once
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued in one transaction; on failure keep it for the next call."""
        self._flush_scheduled = False
        if self._queue:
            batch = self._queue
            # Only the newest row of each agent matters; transitions all go, in order.
            latest = {snapshot.agent_id: snapshot for snapshot, _ in batch}
            transitions = [t for _, t in batch if t is not None]
            try:
                self._store.write_batch(list(latest.values()), transitions)
            except StoreError as exc:
                if not self._failing:
                    log.error("store write failed; will retry", pending=len(batch), error=str(exc))
                self._failing = True
            else:
                self._queue = []  # all of it: nothing can queue while this runs
                if self._failing:
                    log.info("store writes caught up", written=len(batch))
                self._failing = False
        waiters, self._durable_waiters = self._durable_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def durable(self) -> None:
        """Wait for the flush that writes what is queued now (done at once when nothing is).

        A failed flush releases its waiters too: the change is kept and retried, and the
        failure is logged; an operator's request is not held hostage by a database outage.
        """
        if not self._queue or self._failing:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._durable_waiters.append(waiter)
        await waiter
