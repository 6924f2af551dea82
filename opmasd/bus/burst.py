"""Counting and logging of bad input that a sender can repeat as fast as it likes.

A broken agent or a hostile client can send thousands of malformed messages a second; logging
each one would bury the journal and slow the daemon. Each key (usually a subject) logs its
first problem at once, then at most one summary per window: "N more … in the last 10 s".
Counts are kept forever, for stats.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DEFAULT_WINDOW = 10.0


@dataclass
class _Window:
    started: float
    suppressed: int
    last_reason: str
    timer: asyncio.TimerHandle | None


class BurstLog:
    """Counts events per key and logs them at most once per burst.

    Summaries are written by loop timers (call_later handles, no tasks), cancelled by close().
    """

    def __init__(self, event: str, window: float = DEFAULT_WINDOW, level: str = "warning") -> None:
        self._event = event
        self._window = window
        self._level = level
        self._counts: Counter[str] = Counter()
        self._open: dict[str, _Window] = {}

    def record(self, key: str, reason: str, **fields: Any) -> None:
        """Count one event for key; log it if it starts a burst."""
        self._counts[key] += 1
        window = self._open.get(key)
        if window is not None:
            window.suppressed += 1
            window.last_reason = reason
            return
        self._emit(self._event, key=key, reason=reason, **fields)
        self._open[key] = _Window(time.monotonic(), 0, reason, self._schedule(key))

    def _schedule(self, key: str) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # called outside a loop (a test); the summary comes with close()
        return loop.call_later(self._window, self._end_window, key)

    def _end_window(self, key: str) -> None:
        window = self._open.pop(key, None)
        if window is None or window.suppressed == 0:
            return
        self._emit(
            f"{self._event} (repeated)",
            key=key,
            more=window.suppressed,
            seconds=round(time.monotonic() - window.started, 1),
            last_reason=window.last_reason,
        )

    def _emit(self, event: str, **fields: Any) -> None:
        getattr(log, self._level)(event, **fields)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def total(self) -> int:
        return sum(self._counts.values())

    def close(self) -> None:
        """Write the pending summaries now and cancel their timers."""
        for key in list(self._open):
            window = self._open[key]
            if window.timer is not None:
                window.timer.cancel()
            self._end_window(key)
