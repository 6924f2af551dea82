"""Which lines of an agent's log a tail request means: how many, and since when."""

from __future__ import annotations

from datetime import datetime

from opmasd.core.errors import InvalidArgument
from opmasd.runtime.base import LogEntry, Runtime

DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 100_000
# A tail's text at most (its newest lines): what one request makes the daemon hold.
MAX_TAIL_BYTES = 8 << 20


def within_bytes(entries: list[LogEntry], limit: int = MAX_TAIL_BYTES) -> list[LogEntry]:
    """The newest of `entries` whose text stays within `limit` bytes."""
    total, first = 0, len(entries)
    while first > 0 and total + len(entries[first - 1].text) <= limit:
        first -= 1
        total += len(entries[first].text)
    return entries if first == 0 else entries[first:]


async def read_tail(
    runtime: Runtime, agent_id: str, lines: int | None, since: datetime | None
) -> list[LogEntry]:
    """The last `lines` lines (None: 100, or with since all of them up to the cap), only those
    stored at or after `since` when it is given, at most MAX_TAIL_BYTES of them; 0 lines is
    none."""
    if lines is not None and lines < 0:
        raise InvalidArgument.single("tail_lines", f"must not be negative, got {lines}")
    if lines is None:
        lines = MAX_TAIL_LINES if since is not None else DEFAULT_TAIL_LINES
    lines = min(lines, MAX_TAIL_LINES)
    if lines == 0:
        return []
    if since is None:
        return within_bytes(await runtime.tail_logs(agent_id, lines))
    # Lines carry their time, the file has no index by it: read back as far as the cap allows.
    entries = await runtime.tail_logs(agent_id, MAX_TAIL_LINES)
    recent = [entry for entry in entries if entry.time is not None and entry.time >= since]
    return within_bytes(recent[-lines:])
