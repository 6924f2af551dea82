"""Write-behind persistence: every store write the manager makes, queued and committed in batches.

Two kinds of write reach the store, both from here:
- agent rows and their transitions, queued as they happen and written in one transaction at
  the next turn of the event loop, so a burst of changes (200 agents stopped at once) costs one
  commit, not 400; operations that answer an operator wait for that commit (`wait_flush_attempt`);
- heartbeat times, the hottest input opmasd has, kept as a dict of last-seen times and written
  once per heartbeat flush interval (`flush_heartbeats`), never one write per heartbeat.

A write that fails is logged, kept, and retried by the next flush, so a database outage never
stops supervision and loses no transition once the database is back. While the store fails,
`wait_flush_attempt` does not wait (see its docstring): the store issue changes that.

Every store call is timed and every failure counted, and what is still pending is known, for
the manager's stats (manager.stats) and the daemon's readiness (`failing`).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import structlog

from opmasd.core.errors import StoreError, StoreRejected
from opmasd.core.model import AgentRecord, Transition
from opmasd.manager.stats import DurationHistogram
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)


class WriteBehind:
    def __init__(self, store: AgentStore) -> None:
        self._store = store
        # Writes not yet in the store, in order: (snapshot, transition or None for a plain save).
        self._queue: list[tuple[AgentRecord, Transition | None]] = []
        self._flush_scheduled = False
        # Whether the last attempt failed: the queue then waits for the next flush() (retry).
        self._failing = False
        self._flush_waiters: list[asyncio.Future[None]] = []
        # Flushes so far; per agent, the first flush that could have taken its latest write; and
        # the agents whose change a flush dropped: (flush number, why).
        self._generation = 0
        self._queued_at: dict[str, int] = {}
        self._rejected: dict[str, tuple[int, StoreRejected]] = {}
        self._heartbeats: dict[str, datetime] = {}
        self._heartbeats_failing = False
        self.heartbeat_flushes = 0
        # For the metrics: how long each store call took (failed ones too), and how many failed.
        self.row_flush_times = DurationHistogram()
        self.heartbeat_flush_times = DurationHistogram()
        self.failures = 0

    @property
    def pending(self) -> int:
        """Agent rows and transitions queued, not yet committed."""
        return len(self._queue)

    @property
    def pending_heartbeats(self) -> int:
        """Agents whose last-seen time is not yet committed."""
        return len(self._heartbeats)

    @property
    def failing(self) -> bool:
        """Whether the last store write of either kind failed (and waits for a retry)."""
        return self._failing or self._heartbeats_failing

    # -- agent rows and transitions -------------------------------------------------------------

    def write(self, snapshot: AgentRecord, transition: Transition | None) -> None:
        """Queue the agent's row (and the transition that produced it) for the next flush."""
        self._queue.append((snapshot, transition))
        self._queued_at[snapshot.agent_id] = self._generation + 1
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
        """Write everything queued in one transaction; on failure keep it for the next call.

        A batch the database refuses for its values (StoreRejected: a constraint, a value too
        long) is written again agent by agent, so that only the agents whose rows are refused
        are dropped, with their callers told why, and nothing behind them is held up.
        """
        self._flush_scheduled = False
        self._generation += 1
        if self._queue:
            batch = self._queue
            started = time.perf_counter()
            try:
                self._write(batch)
            except StoreRejected:
                self._queue = []
                self._isolate(batch)
            except StoreError as exc:
                self.failures += 1
                if not self._failing:
                    log.error("store write failed; will retry", pending=len(batch), error=str(exc))
                self._failing = True
            else:
                self._queue = []  # all of it: nothing can queue while this runs
                if self._failing:
                    log.info("store writes caught up", written=len(batch))
                self._failing = False
            finally:
                self.row_flush_times.observe(time.perf_counter() - started)
        waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _write(self, batch: list[tuple[AgentRecord, Transition | None]]) -> None:
        # Only the newest row of each agent matters; transitions all go, in order.
        latest = {snapshot.agent_id: snapshot for snapshot, _ in batch}
        transitions = [t for _, t in batch if t is not None]
        self._store.write_batch(list(latest.values()), transitions)

    def _isolate(self, batch: list[tuple[AgentRecord, Transition | None]]) -> None:
        """Write each agent's part of a refused batch on its own; drop the refused parts."""
        by_agent: dict[str, list[tuple[AgentRecord, Transition | None]]] = {}
        for entry in batch:
            by_agent.setdefault(entry[0].agent_id, []).append(entry)
        for position, (agent_id, entries) in enumerate(by_agent.items()):
            try:
                self._write(entries)
            except StoreRejected as exc:
                self.failures += 1
                self._rejected[agent_id] = (self._generation, exc)
                log.error("store refused an agent's row; change dropped", agent_id=agent_id, error=str(exc))
            except StoreError as exc:
                # The database went away meanwhile: the rest waits for the next flush, in order.
                self.failures += 1
                self._failing = True
                rest = [e for entries_left in list(by_agent.values())[position:] for e in entries_left]
                self._queue = rest + self._queue
                log.error("store write failed; will retry", pending=len(rest), error=str(exc))
                return

    async def wait_flush_attempt(self, agent_id: str = "") -> None:
        """Wait for the flush attempt that covers what is queued now (at once when nothing is).

        Raises StoreRejected when that flush dropped agent_id's change because the database
        refused it. A failed flush releases its waiters too, and while the store is failing
        this returns at once: the change is kept and retried, and the failure is logged, so an
        operator's request is not held hostage by a database outage — but it is then not yet
        committed (the store issue changes that).
        """
        if self._queue and not self._failing:
            waiter = asyncio.get_running_loop().create_future()
            self._flush_waiters.append(waiter)
            await waiter
        rejected = self._rejected.get(agent_id) if agent_id else None
        if rejected is not None and rejected[0] >= self._queued_at.get(agent_id, 0):
            del self._rejected[agent_id]
            raise rejected[1]

    # -- heartbeat times ------------------------------------------------------------------------

    def note_heartbeat(self, agent_id: str, seen: datetime) -> None:
        """Remember the agent's last heartbeat time for the next heartbeat flush."""
        self._heartbeats[agent_id] = seen

    def forget_heartbeat(self, agent_id: str) -> None:
        self._heartbeats.pop(agent_id, None)

    def flush_heartbeats(self) -> None:
        """Write the last-seen times gathered since the previous flush, in one transaction."""
        if not self._heartbeats:
            return
        batch, self._heartbeats = self._heartbeats, {}
        started = time.perf_counter()
        try:
            self._store.save_heartbeats(batch)
            self.heartbeat_flushes += 1
            self._heartbeats_failing = False
        except StoreError as exc:
            self.failures += 1
            self._heartbeats_failing = True
            # Keep them for the next flush; newer times taken meanwhile win.
            log.warning("heartbeat flush failed; will retry", agents=len(batch), error=str(exc))
            self._heartbeats = {**batch, **self._heartbeats}
        finally:
            self.heartbeat_flush_times.observe(time.perf_counter() - started)

    def close(self) -> None:
        """The last flush of both kinds (daemon shutdown)."""
        self.flush_heartbeats()
        self.flush()
