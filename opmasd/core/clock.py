"""Time, behind one small interface: monotonic seconds for durations, UTC wall time for display.

Wall time is what records show and stores keep. The manager's parts (registry, supervisor,
heartbeat judge) take a Clock, so that tests drive their time rules with
opmasd.testing.clock.FakeClock instead of sleeping. They still measure durations (how long a
process ran, how long an agent has been silent) as differences of wall times; moving those to
`monotonic()`, which a stepped wall clock cannot move, is the faults issue's work.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


def utcnow() -> datetime:
    """The current wall time, tz-aware, in UTC."""
    return datetime.now(UTC)


def rfc3339(value: datetime) -> str:
    """A time as RFC 3339 text in UTC with milliseconds ("2026-12-01T21:15:47.123Z")."""
    utc = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that only moves forward; for durations and deadlines."""

    def now(self) -> datetime:
        """The wall time in UTC; for what is shown and stored."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return utcnow()


SYSTEM_CLOCK = SystemClock()
