"""How much of the agents' logs the API holds at once while sending tails: TailBudget.

A tail is read whole (up to log_tail's MAX_TAIL_BYTES) and then sent line by line as the client
takes them, so a client that asks for big tails on many streams and reads none held a tail's
lines in memory for each: a viewer grew the daemon by gigabytes. Here the tails being read at
once are few (each read can take all of an agent's log files), and the lines held by tails
being sent share one budget: a tail that does not fit waits for one to end, for a while, and is
then refused (UNAVAILABLE: try again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from opmasd.core.errors import Unavailable
from opmasd.core.logs import LogEntry

# What a line costs beyond its text (the entry, its message on the way out).
LINE_OVERHEAD = 200


class TailBudget:
    def __init__(self, total_bytes: int = 64 << 20, readers: int = 2, wait: float = 10.0) -> None:
        self._total = total_bytes
        self._free = total_bytes
        self._reading = asyncio.Semaphore(readers)
        self._changed = asyncio.Condition()
        self._wait = wait

    @property
    def held(self) -> int:
        """Bytes of tails being sent now."""
        return self._total - self._free

    @contextlib.asynccontextmanager
    async def tail(self, read: Callable[[], Awaitable[list[LogEntry]]]) -> AsyncIterator[list[LogEntry]]:
        """The lines `read` returns, counted against the budget until the block ends."""
        async with self._reading:
            entries = await read()
        size = min(self._total, sum(len(entry.text) + LINE_OVERHEAD for entry in entries))
        try:
            await asyncio.wait_for(self._take(size), self._wait)
        except TimeoutError:
            raise Unavailable("too many log tails are being sent now; try again shortly") from None
        try:
            yield entries
        finally:
            async with self._changed:
                self._free += size
                self._changed.notify_all()

    async def _take(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._free >= size)
            self._free -= size
