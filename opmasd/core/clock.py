"""Time, behind one small interface: monotonic seconds for durations, UTC wall time for display.

Wall time is what records show and stores keep; it may step (NTP, an operator's `date -s`), so
no duration is ever a difference of wall times. Durations and deadlines (backoff, the stability
window, heartbeat silence, uptime) are differences of `monotonic()`, which is the kernel's
CLOCK_BOOTTIME: it never steps, and it is the clock that process start times in /proc count in
(runtime.procstat), so the age of a process a restarted daemon adopts is known exactly.

The manager's parts (registry, supervisor, heartbeat judge) take a Clock, so that tests drive
their time rules with opmasd.testing.clock.FakeClock instead of sleeping.
"""

from __future__ import annotations

import asyncio
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
        """Seconds since boot on a clock that only moves forward; for durations and deadlines."""

    def now(self) -> datetime:
        """The wall time in UTC; for what is shown and stored."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of monotonic time."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def now(self) -> datetime:
        return utcnow()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
