"""Keeps a repeating warning (a flood of malformed records, NATS down) from flooding the log."""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Lets a line per key through every `interval` seconds and counts the ones it held back.

    Example:
        suppressed = throttle.allow("malformed")
        if suppressed is not None:
            log.warning("malformed message", suppressed=suppressed)
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to stay quiet; otherwise how many lines for `key` were held back since the last."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
