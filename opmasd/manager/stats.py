"""The manager's own numbers, as one plain value: agents by state, restarts, heartbeats, store writes.

The counters behind it are ints the hot paths increment (a heartbeat costs one `+= 1`) and a
fixed-bucket histogram of store flush times; `AgentManager.stats()` reads them all at once into
a `ManagerStats`, which an exporter (the api's Prometheus collector) turns into metrics at
scrape time. Nothing here knows of any metrics library.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from opmasd.core.model import AgentRecord, AgentState

# Upper bounds (seconds) of the flush-time buckets: a SQLite commit takes well under a
# millisecond to a few; a PostgreSQL one across a network, tens; a struggling store, seconds.
FLUSH_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class Durations:
    """A histogram snapshot: counts per bucket (not cumulative; the last one is above every
    bound), and the sum of all observations in seconds."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class DurationHistogram:
    """Observations of durations into fixed buckets: an index search and two additions each."""

    def __init__(self, bounds: tuple[float, ...] = FLUSH_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le = "≤").
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._total += seconds

    def snapshot(self) -> Durations:
        return Durations(self._bounds, tuple(self._counts), self._total)


@dataclass(frozen=True)
class ManagerStats:
    """What the manager counted, read at one moment. Counters run from the daemon's start."""

    # Live (not deleted) agents per state; every state is present, zero included.
    agents_by_state: Mapping[AgentState, int]
    # The sum of the agents' own restart_count (kept in the store, reset when an operator
    # starts the agent anew) per state: a gauge, unlike the counters below.
    restart_count_by_state: Mapping[AgentState, int]
    # Restarts the policy made since the daemon started: after an exit, after inactivity.
    restarts_after_exit: int
    restarts_after_inactive: int
    # Every heartbeat that reached the manager; of those, the ones from an unknown agent.
    heartbeats_received: int
    heartbeats_unknown: int
    # Agents marked inactive because their heartbeat stopped (one per time it happened).
    heartbeats_late: int
    # Store writes not yet committed: agent rows and transitions, and last-seen times.
    pending_writes: int
    pending_heartbeats: int
    # Whether the last write of either kind failed (kept, retried at the next flush).
    store_failing: bool
    store_failures: int
    row_flushes: Durations
    heartbeat_flushes: Durations


def count_by_state(records: Iterable[AgentRecord]) -> tuple[dict[AgentState, int], dict[AgentState, int]]:
    """How many agents are in each state, and the sum of their restart counts (one pass)."""
    by_state = dict.fromkeys(AgentState, 0)
    restarts_by_state = dict.fromkeys(AgentState, 0)
    for rec in records:
        by_state[rec.state] += 1
        restarts_by_state[rec.state] += rec.restart_count
    return by_state, restarts_by_state


class _Restarts(Protocol):
    @property
    def restarts_after_exit(self) -> int: ...
    @property
    def restarts_after_inactive(self) -> int: ...


class _Heartbeats(Protocol):
    @property
    def heartbeats_received(self) -> int: ...
    @property
    def heartbeats_unknown(self) -> int: ...
    @property
    def heartbeats_late(self) -> int: ...


class _Writes(Protocol):
    @property
    def pending(self) -> int: ...
    @property
    def pending_heartbeats(self) -> int: ...
    @property
    def failing(self) -> bool: ...
    @property
    def failures(self) -> int: ...
    @property
    def row_flush_times(self) -> DurationHistogram: ...
    @property
    def heartbeat_flush_times(self) -> DurationHistogram: ...


def collect_stats(
    records: Iterable[AgentRecord], supervisor: _Restarts, writes: _Writes, judge: _Heartbeats
) -> ManagerStats:
    """The manager's numbers now (one pass over the agents), for metrics and readiness."""
    by_state, restarts_by_state = count_by_state(records)
    return ManagerStats(
        agents_by_state=by_state,
        restart_count_by_state=restarts_by_state,
        restarts_after_exit=supervisor.restarts_after_exit,
        restarts_after_inactive=supervisor.restarts_after_inactive,
        heartbeats_received=judge.heartbeats_received,
        heartbeats_unknown=judge.heartbeats_unknown,
        heartbeats_late=judge.heartbeats_late,
        pending_writes=writes.pending,
        pending_heartbeats=writes.pending_heartbeats,
        store_failing=writes.failing,
        store_failures=writes.failures,
        row_flushes=writes.row_flush_times.snapshot(),
        heartbeat_flushes=writes.heartbeat_flush_times.snapshot(),
    )
