"""One line of an agent's log as the domain sees it: when it was written, by which stream, what.

The runtime reads lines back from wherever it stores them and returns these; the api turns them
into wire messages. A line stored before streams were recorded has no time and an unknown stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class LogStream(enum.Enum):
    """Who wrote a line: the agent's stdout, its stderr, or the daemon (launch and exit notes)."""

    UNKNOWN = "unknown"
    STDOUT = "stdout"
    STDERR = "stderr"
    OPMASD = "opmasd"


@dataclass(frozen=True)
class LogEntry:
    # The line's text, without its line break.
    text: str
    stream: LogStream = LogStream.UNKNOWN
    # When the line was stored (UTC, millisecond precision); None when not recorded.
    time: datetime | None = None
