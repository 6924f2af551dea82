"""A clock that moves only when the test says so, for time rules tested without sleeping."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta


class FakeClock:
    """The Clock protocol (opmasd.core.clock) on manual time: both clocks move by advance().

    sleep() returns once advance() has moved the monotonic clock past its deadline; step_wall()
    moves only the wall clock, as NTP or `date -s` would, to show that no duration depends on it.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._wall = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._monotonic = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._monotonic

    def now(self) -> datetime:
        return self._wall

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._monotonic + seconds, future))
        await future

    @property
    def sleepers(self) -> list[float]:
        """The deadlines of the sleeps in progress (monotonic seconds), earliest first."""
        return sorted(deadline for deadline, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds:g}s)")
        self._monotonic += seconds
        self._wall += timedelta(seconds=seconds)
        waiting = []
        for deadline, future in self._sleepers:
            if future.done():
                continue
            if deadline <= self._monotonic:
                future.set_result(None)
            else:
                waiting.append((deadline, future))
        self._sleepers = waiting

    def step_wall(self, seconds: float) -> None:
        """Move the wall clock only (either way); monotonic time and sleepers are unaffected."""
        self._wall += timedelta(seconds=seconds)
