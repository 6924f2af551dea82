"""A process's identity and family as the kernel states them in /proc/PID/stat.

The start time there counts clock ticks since boot (CLOCK_BOOTTIME), so the pair (PID, start
time) names one process whatever the wall clock did meanwhile: psutil's create_time() adds the
wall-clock boot time to it, which a clock step moves, and then a restarted daemon would refuse
to adopt every agent it had left running and start each one a second time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Two start times within half a tick are the same tick (they went through a float and a store).
SAME_START_TOLERANCE = 0.5 / CLOCK_TICKS


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    # Seconds since boot at which the process started (a whole number of clock ticks).
    start_time: float

    @property
    def zombie(self) -> bool:
        """Ended but not reaped: its PID is still taken, yet it is gone all the same."""
        return self.state in ("Z", "X")


def read(pid: int) -> ProcStat | None:
    """The process's stat line, or None when no process has that PID (or it is unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return parse(pid, file.read(4096))
    except (OSError, ValueError):
        return None


def parse(pid: int, stat: bytes) -> ProcStat:
    """Parse a stat line. The command name may hold spaces and ')': fields resume after the last ')'.

    ValueError for a line that is not one.
    """
    end = stat.rfind(b")")
    if end < 0:
        raise ValueError(f"not a /proc stat line for pid {pid}")
    fields = stat[end + 2 :].split()
    if len(fields) < 20:
        raise ValueError(f"short /proc stat line for pid {pid}")
    return ProcStat(
        pid=pid,
        state=fields[0].decode("ascii", "replace"),
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        start_time=int(fields[19]) / CLOCK_TICKS,
    )


def same_start(first: float, second: float) -> bool:
    return abs(first - second) <= SAME_START_TOLERANCE


def command_line(pid: int, limit: int = 256) -> str:
    """The process's command line for a report ("" when gone), at most `limit` characters."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read(limit + 1)
    except OSError:
        return ""
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 1] + "…"
