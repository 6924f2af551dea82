"""Which lines of an agent's log a tail request means: how many, and since when."""

from __future__ import annotations

from datetime import datetime

from opmasd.core.errors import InvalidArgument
from opmasd.runtime.base import LogEntry, Runtime

DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 100_000


async def read_tail(
    runtime: Runtime, agent_id: str, lines: int | None, since: datetime | None
) -> list[LogEntry]:
    """The last `lines` lines (None: 100, or with since all of them up to the cap), only those
    stored at or after `since` when it is given; 0 lines is none."""
    if lines is not None and lines < 0:
        raise InvalidArgument.single("tail_lines", f"must not be negative, got {lines}")
    if lines is None:
        lines = MAX_TAIL_LINES if since is not None else DEFAULT_TAIL_LINES
    lines = min(lines, MAX_TAIL_LINES)
    if lines == 0:
        return []
    if since is None:
        return await runtime.tail_logs(agent_id, lines)
    # Lines carry their time, the file has no index by it: read back as far as the cap allows.
    entries = await runtime.tail_logs(agent_id, MAX_TAIL_LINES)
    recent = [entry for entry in entries if entry.time is not None and entry.time >= since]
    return recent[-lines:]
