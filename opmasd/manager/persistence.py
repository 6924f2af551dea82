"""Persistence: every store write the manager makes, coalesced per agent, committed off the loop.

Two kinds of write reach the store, both from here, and every store call runs on one thread of
its own (core.serial_thread), so a slow, frozen or absent database never stalls the event loop:

- agent rows and their transitions. Each agent has at most one pending entry: its newest row
  (a full snapshot of the record) and the transitions not yet written, so the queue is bounded
  by the number of agents (and `MAX_PENDING_TRANSITIONS` each). A background flusher writes
  everything pending in one transaction per attempt; a burst (200 agents stopped at once)
  costs one commit, not 400.
- heartbeat times, the hottest input opmasd has, kept as a dict of last-seen times and written
  once per heartbeat flush interval (`flush_heartbeats`), never one write per heartbeat.

**Acknowledged means committed.** An operator's change (registration, update, desired state,
deletion) is made in memory, then `commit(agent_id)` waits until the row carrying it is
committed, or raises: StoreRejected when the database refuses its values, StoreError when the
store failed or did not answer within `commit_timeout`. A failed commit's row is *not* retried:
its caller puts the record back as it was (manager.operations) and saves that, so memory and the
database agree on what was acknowledged. Observations (state changes, PIDs, exits) are retried
until they are written, with a backoff while the store fails; an operator's commit asks for an
attempt at once.

Every store call is timed and every failure counted, and what is still pending is known, for
the manager's stats (manager.stats) and the daemon's readiness (`failing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import structlog

from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.errors import StoreDegraded, StoreError, StoreRejected
from opmasd.core.model import AgentRecord, Transition
from opmasd.core.serial_thread import SerialThread
from opmasd.manager.stats import DurationHistogram
from opmasd.manager.write_batches import Entry, Outcome, retrieve, settle_waiter, write_entries
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Transitions kept per agent while the store is down; older ones are dropped (and counted):
# the agent's row, which is what re-adoption needs, is always kept.
MAX_PENDING_TRANSITIONS = 1000
# How long an operator's commit already handed to the database may still wait for its outcome
# past commit_timeout: above any bound the store itself puts on a call.
OUTCOME_WAIT = 60.0
RETRY_INITIAL = 0.25
RETRY_MAX = 5.0


class WriteBehind:
    def __init__(self, store: AgentStore, clock: Clock = SYSTEM_CLOCK, commit_timeout: float = 5.0) -> None:
        self._store = store
        self._clock = clock
        self.commit_timeout = commit_timeout
        self._thread = SerialThread("opmasd-store")
        self._pending: dict[str, Entry] = {}
        self._in_flight: dict[str, Entry] = {}
        # Rows of registrations undone, to remove (agent id → its created_at).
        self._removals: dict[str, datetime] = {}
        # Waiters for the next attempt as a whole (discovery), and the attempt lock.
        self._attempt_waiters: list[asyncio.Future[None]] = []
        self._attempt = asyncio.Lock()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._failing = False
        self._retry_delay = RETRY_INITIAL
        # Agents whose last change the database refused, and why (told to their next waiter).
        self._rejected: dict[str, StoreRejected] = {}
        self._heartbeats: dict[str, datetime] = {}
        self._heartbeats_failing = False
        self._heartbeat_flushing = False
        self.heartbeat_flushes = 0
        self.dropped_transitions = 0
        # For the metrics: how long each store call took (failed ones too), and how many failed.
        self.row_flush_times = DurationHistogram()
        self.heartbeat_flush_times = DurationHistogram()
        self.failures = 0

    @property
    def pending(self) -> int:
        """Agent rows and transitions not yet committed (queued or being written)."""
        return sum(
            (entry.snapshot is not None) + len(entry.transitions)
            for entries in (self._pending, self._in_flight)
            for entry in entries.values()
        )

    @property
    def pending_heartbeats(self) -> int:
        """Agents whose last-seen time is not yet committed."""
        return len(self._heartbeats)

    @property
    def failing(self) -> bool:
        """Whether the last store write of either kind failed (and waits for a retry)."""
        return self._failing or self._heartbeats_failing

    async def call(self, call: Callable[[], T], what: str) -> T:
        """Any other store call (loading, pruning, closing), on the store's thread, in order."""
        return await self._thread.run(call, what)

    # -- agent rows and transitions -------------------------------------------------------------

    def write(self, snapshot: AgentRecord, transition: Transition | None) -> None:
        """Queue the agent's row (and the transition that produced it) for the next attempt."""
        entry = self._pending.get(snapshot.agent_id)
        if entry is None:
            entry = self._pending[snapshot.agent_id] = Entry(snapshot)
        else:
            entry.snapshot = snapshot
        if transition is not None:
            entry.transitions.append(transition)
            if len(entry.transitions) > MAX_PENDING_TRANSITIONS:
                del entry.transitions[0]
                self.dropped_transitions += 1
                if self.dropped_transitions % 1000 == 1:
                    log.warning(
                        "store down: oldest unwritten transitions dropped",
                        agent_id=snapshot.agent_id,
                        dropped=self.dropped_transitions,
                    )
        self._rejected.pop(snapshot.agent_id, None)
        self._wake.set()
        if self._flusher is None:
            with contextlib.suppress(RuntimeError):  # no loop yet: start() comes with it
                asyncio.get_running_loop()
                self.start()

    def forget(self, agent_id: str, created_at: datetime) -> None:
        """A registration undone: drop what is queued for it, and remove its row should the
        write whose outcome was unknown have landed after all (only the row created then)."""
        entry = self._pending.pop(agent_id, None)
        for waiter in entry.waiters if entry else ():
            if not waiter.done():
                waiter.set_result(None)
        self._removals[agent_id] = created_at
        self._wake.set()

    async def commit(self, agent_id: str) -> None:
        """Wait until the agent's newest row is committed; an operator's change hangs on it.

        StoreRejected: the database refused its values. StoreError: the store failed, or did
        not answer within commit_timeout; the row is then not retried (see the module's doc).
        """
        error = (await self.commit_many([agent_id])).get(agent_id)
        if error is not None:
            raise error

    async def commit_many(self, agent_ids: list[str]) -> dict[str, StoreError]:
        """commit() for several agents at once, in one attempt and one wait (a bulk operation):
        the error of each agent whose row was not committed."""
        return await self._wait_for_rows(agent_ids, commit=True)

    async def flushed_many(self, agent_ids: list[str]) -> dict[str, StoreError]:
        """Wait for the attempt that writes what is queued now for these agents; the error of
        each whose write failed. What failed stays queued and is retried."""
        return await self._wait_for_rows(agent_ids, commit=False)

    async def flushed(self, agent_id: str = "") -> None:
        """Wait for the attempt that writes what is queued now (for agent_id, or everything);
        its error if it failed. What failed stays queued and is retried."""
        if agent_id:
            error = (await self.flushed_many([agent_id])).get(agent_id)
            if error is not None:
                raise error
            return
        if not (self._pending or self._in_flight):
            return
        waiter = self._waiter(asyncio.get_running_loop())
        self._attempt_waiters.append(waiter)
        self._ask_for_attempt()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.commit_timeout)
        except TimeoutError:
            raise self._no_answer() from None

    @staticmethod
    def _waiter(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = loop.create_future()
        # A waiter that timed out is settled later by its attempt: nobody reads that outcome.
        waiter.add_done_callback(retrieve)
        return waiter

    def _ask_for_attempt(self) -> None:
        self.start()
        self._urgent.set()
        self._wake.set()

    def _no_answer(self) -> StoreError:
        stuck = f" (stuck in: {self._thread.current})" if self._thread.current else ""
        return StoreError(f"the database did not confirm the write within {self.commit_timeout:g}s{stuck}")

    async def _wait_for_rows(self, agent_ids: list[str], commit: bool) -> dict[str, StoreError]:
        """Wait for the attempt writing each agent's queued row; the errors, by agent."""
        errors: dict[str, StoreError] = {}
        waiters: dict[str, asyncio.Future[None]] = {}
        entries: dict[str, Entry] = {}
        loop = asyncio.get_running_loop()
        for agent_id in agent_ids:
            entry = self._pending.get(agent_id) or self._in_flight.get(agent_id)
            if entry is None:
                rejected = self._rejected.pop(agent_id, None)
                if rejected is not None:
                    errors[agent_id] = rejected
                continue
            waiter = self._waiter(loop)
            entry.waiters.append(waiter)
            entries[agent_id] = entry
            if entry is self._pending.get(agent_id):
                # Only a row not yet handed over can become a commit: one being written was
                # sent as an observation, and its waiter hears that outcome.
                entry.commit = entry.commit or commit
            waiters[agent_id] = waiter
        if not waiters:
            return errors
        self._ask_for_attempt()
        # asyncio.wait neither cancels the waiters on its timeout nor when this caller is.
        await asyncio.wait(waiters.values(), timeout=self.commit_timeout)
        in_flight: dict[str, asyncio.Future[None]] = {}
        for agent_id, waiter in waiters.items():
            if waiter.done():
                if waiter.exception() is not None:
                    errors[agent_id] = waiter.exception()  # type: ignore[assignment]  # StoreErrors
            elif self._pending.get(agent_id) is entries[agent_id]:
                # Not yet handed to the database: the caller's restored row replaces it there.
                entries[agent_id].commit = False
                errors[agent_id] = self._no_answer()
            elif commit:
                in_flight[agent_id] = waiter
            else:
                errors[agent_id] = self._no_answer()
        if in_flight:
            # Being written now: its outcome decides. An undo could not take back a write that
            # lands after it, so wait for the store's own bound on the call (the database's
            # statement timeout, a connection cut past it) rather than guess.
            await asyncio.wait(in_flight.values(), timeout=OUTCOME_WAIT)
            for agent_id, waiter in in_flight.items():
                if not waiter.done():
                    log.error("a commit's outcome is unknown: the store call never ended", agent_id=agent_id)
                    errors[agent_id] = self._no_answer()
                elif waiter.exception() is not None:
                    errors[agent_id] = waiter.exception()  # type: ignore[assignment]
        return errors

    def start(self) -> None:
        """Start the background flusher (needs the running loop; RuntimeError without one)."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="store-flusher")

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if await self.flush():
                    self._retry_delay = RETRY_INITIAL
                    continue
            except Exception:  # a bug, not the database: logged, and the flusher lives on
                log.exception("store flush failed unexpectedly; will retry")
            # Back off while the store fails, unless an operator's commit wants an attempt now.
            self._urgent.clear()
            urgent = asyncio.ensure_future(self._urgent.wait())
            pause = asyncio.ensure_future(self._clock.sleep(self._retry_delay))
            try:
                await asyncio.wait({urgent, pause}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                urgent.cancel()
                pause.cancel()
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            self._wake.set()

    async def flush(self) -> bool:
        """One attempt at writing everything pending, in one transaction; whether it succeeded.

        A batch the database refuses for its values (StoreRejected: a constraint, a value too
        long) is written again agent by agent, so that only the agents whose rows are refused
        are dropped, with their callers told why, and nothing behind them is held up.
        """
        async with self._attempt:
            attempt_waiters, self._attempt_waiters = self._attempt_waiters, []
            if self._removals:
                await self._remove()
            batch, self._pending = self._pending, {}
            self._in_flight = batch
            error: StoreError | None = None
            started = time.perf_counter()
            cancelled = False
            if batch:
                job = self._thread.submit(lambda: write_entries(self._store, batch), "write agents")
                # The write is under way on the thread and cannot be taken back: whoever cancels
                # this attempt waits for its outcome, so that nothing is lost or written twice.
                while not job.done():
                    try:
                        await asyncio.shield(job)
                    except asyncio.CancelledError:
                        cancelled = True
                outcome: dict[str, Outcome]
                if job.cancelled():  # only by hand: the outcome is unknown, so it is retried
                    interrupted = StoreError("the write was interrupted")
                    outcome = dict.fromkeys(batch, Outcome(interrupted, interrupted))
                else:
                    outcome = job.result()
                error = self._settle(batch, outcome)
            elif self._failing:
                error = await self._sync()
            self._in_flight = {}
            self.row_flush_times.observe(time.perf_counter() - started)
            for waiter in attempt_waiters:
                settle_waiter(waiter, error)
            if cancelled:
                raise asyncio.CancelledError
            return error is None

    async def _remove(self) -> None:
        """Remove the rows of registrations undone, before anything else is written (a new
        registration of the same id comes later in the queue); kept for a retry on failure."""
        removals, self._removals = self._removals, {}
        try:
            await self._thread.run(lambda: self._store.remove_rows(removals), "remove agents")
        except asyncio.CancelledError:  # removing twice is harmless: keep them for the last flush
            self._removals = {**removals, **self._removals}
            raise
        except StoreDegraded:
            pass  # done in the node's copy; the store does the rest when it can
        except StoreError as exc:
            log.warning("rows of undone registrations not removed yet; will retry", error=str(exc))
            self._removals = {**removals, **self._removals}
            self._failing = True

    async def _sync(self) -> StoreError | None:
        """Nothing queued, but the last attempt failed: whether the store is whole again (a
        node copy writes what it kept to the shared database)."""
        try:
            await self._thread.run(self._store.sync, "sync the store")
        except StoreError as exc:
            return exc
        log.info("store writes caught up")
        self._failing = False
        return None

    def _settle(self, batch: dict[str, Entry], outcome: dict[str, Outcome]) -> StoreError | None:
        """Tell each agent's waiters; put back what failed for a retry. The first failure."""
        first: StoreError | None = None
        retry: dict[str, Entry] = {}
        for agent_id, entry in batch.items():
            result = outcome[agent_id]
            # An operator's change is told its commit's outcome, anyone else the observations'.
            error = result.committed if entry.commit else result.observed
            refused = next(
                (e for e in (result.committed, result.observed) if isinstance(e, StoreRejected)), None
            )
            if refused is not None:
                self.failures += 1
                log.error(
                    "store refused an agent's row; change dropped", agent_id=agent_id, error=str(refused)
                )
                if not entry.waiters:
                    self._rejected[agent_id] = refused
            for failed in (result.observed, result.committed):
                if failed is not None and not isinstance(failed, StoreRejected):
                    first = first or failed
            observed = result.observed
            # Retried unless refused, or kept by the store itself (StoreDegraded). An operator's
            # change that failed is not retried: its caller restores the row.
            if observed is not None and not isinstance(observed, StoreRejected | StoreDegraded):
                kept = Entry(None if entry.commit else entry.snapshot, entry.transitions)
                if kept.snapshot is not None or kept.transitions:
                    retry[agent_id] = kept
            for waiter in entry.waiters:
                settle_waiter(waiter, error)
        if first is not None:
            self.failures += 1
            for agent_id, newer in self._pending.items():
                if agent_id in retry:
                    retry[agent_id].absorb(newer)
                else:
                    retry[agent_id] = newer
            self._pending = retry
            if not self._failing:
                log.error("store write failed; will retry", pending=len(retry), error=str(first))
            self._failing = True
        elif self._failing:
            log.info("store writes caught up", written=len(batch))
            self._failing = False
        return first

    # -- heartbeat times ------------------------------------------------------------------------

    def note_heartbeat(self, agent_id: str, seen: datetime) -> None:
        """Remember the agent's last heartbeat time for the next heartbeat flush."""
        self._heartbeats[agent_id] = seen

    def forget_heartbeat(self, agent_id: str) -> None:
        self._heartbeats.pop(agent_id, None)

    async def flush_heartbeats(self) -> None:
        """Write the last-seen times gathered since the previous flush, in one transaction.
        One at a time: while the store is stuck, later flushes are skipped, not queued."""
        if not self._heartbeats or self._heartbeat_flushing:
            return
        batch, self._heartbeats = self._heartbeats, {}
        started = time.perf_counter()
        self._heartbeat_flushing = True
        try:
            await self._thread.run(lambda: self._store.save_heartbeats(batch), "save heartbeats")
            self.heartbeat_flushes += 1
            self._heartbeats_failing = False
        except StoreError as exc:
            self.failures += 1
            self._heartbeats_failing = True
            # Keep them for the next flush; newer times taken meanwhile win.
            log.warning("heartbeat flush failed; will retry", agents=len(batch), error=str(exc))
            self._heartbeats = {**batch, **self._heartbeats}
        finally:
            self._heartbeat_flushing = False
            self.heartbeat_flush_times.observe(time.perf_counter() - started)

    async def close(self, timeout: float) -> None:
        """The last flush of both kinds (daemon shutdown), within timeout. What could not be
        written is logged, never dropped silently. The store itself is its opener's to close."""
        last = asyncio.ensure_future(self._last_flush())
        # Not wait_for: it would wait for the cancelled flush, which waits for the database.
        done, _ = await asyncio.wait({last}, timeout=timeout)
        if not done:
            log.error("the store did not answer the last flush in time", timeout=timeout)
        if self.pending or self._heartbeats:
            log.error(
                "changes not written at shutdown: the store is unavailable",
                rows_and_transitions=self.pending,
                heartbeats=len(self._heartbeats),
            )
        self._thread.close()

    async def _last_flush(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()  # an attempt under way finishes first (see flush)
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush_heartbeats()
        await self.flush()
