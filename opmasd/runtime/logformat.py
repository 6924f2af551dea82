"""The on-disk layout of agent logs: file names, and one stored line `<UTC time> <stream> <text>`.

Shared by the log relay (which writes) and logfiles (which reads), so it imports only the
standard library: the relay must start fast and stay small.

A stored line is `2026-12-02T00:55:01.123Z out <text>` — a fixed 29-byte prefix (time with
milliseconds, `Z`, a space, a three-letter stream tag, a space) then the text as the agent wrote
it, up to and excluding its newline. Tags: `out` (stdout), `err` (stderr), `opm` (a note of the
daemon: launch, exit). It stays readable with `less`, `tail -f` and `grep ' err '`. The time is
when the relay read the line from the pipe (one read carries many lines, which share it). A
line longer than MAX_TEXT is stored as several lines of the same stream.

Files: `<dir>/<agent_id>.log` is the live file, `<agent_id>.log.1` the newest backup, up to
`.log.<backups>`.
"""

from __future__ import annotations

import time
from pathlib import Path

TIME_LEN = 24  # 2026-12-02T00:55:01.123Z
PREFIX_LEN = TIME_LEN + 5  # the time, " out "
STDOUT = b"out"
STDERR = b"err"
OPMASD = b"opm"
TAGS = (STDOUT, STDERR, OPMASD)
# A line's text is cut into pieces of at most this many bytes: nothing buffers without bound.
MAX_TEXT = 64 * 1024


def log_path(directory: Path, agent_id: str) -> Path:
    """The live log file of an agent. ValueError for an id that cannot be a file name."""
    if not agent_id or "/" in agent_id or "\0" in agent_id or agent_id in (".", ".."):
        raise ValueError(f"agent id {agent_id!r} cannot name a log file")
    return directory / f"{agent_id}.log"


def backup_path(directory: Path, agent_id: str, number: int) -> Path:
    return directory / f"{agent_id}.log.{number}"


class Stamper:
    """`<time> ` prefixes; the formatted time is cached for the millisecond it stands for."""

    def __init__(self) -> None:
        self._millis = -1
        self._stamp = b""

    def stamp(self, now: float | None = None) -> bytes:
        """The 24-byte UTC time of `now` (default: the current time)."""
        if now is None:
            now = time.time()
        millis = int(now * 1000)
        if millis != self._millis:
            seconds, ms = divmod(millis, 1000)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"
            self._millis, self._stamp = millis, text.encode()
        return self._stamp

    def prefix(self, tag: bytes, now: float | None = None) -> bytes:
        return self.stamp(now) + b" " + tag + b" "


def format_lines(prefix: bytes, lines: list[bytes]) -> bytes:
    """Complete lines (without newlines, each at most MAX_TEXT) as stored, newline-terminated."""
    if not lines:
        return b""
    return prefix + (b"\n" + prefix).join(lines) + b"\n"


def cut(text: bytes, size: int) -> list[bytes]:
    """`text` in pieces of at most `size` bytes (one empty piece for empty text)."""
    if len(text) <= size:
        return [text]
    return [text[start : start + size] for start in range(0, len(text), size)]


def parse_line(raw: bytes) -> tuple[str | None, bytes | None, bytes]:
    """(time text, stream tag, text) of a stored line; (None, None, raw) when not in the format.

    A line from before the format (or cut by a tiny cap) is returned whole as text.
    """
    if (
        len(raw) >= PREFIX_LEN
        and raw[TIME_LEN - 1 : TIME_LEN + 1] == b"Z "
        and raw[PREFIX_LEN - 1 : PREFIX_LEN] == b" "
        and raw[10:11] == b"T"
        and raw[TIME_LEN + 1 : PREFIX_LEN - 1] in TAGS
    ):
        return raw[:TIME_LEN].decode("ascii", "replace"), raw[TIME_LEN + 1 : PREFIX_LEN - 1], raw[PREFIX_LEN:]
    return None, None, raw
