"""Reading agents' log files: the last lines (tail) and new lines as they come (follow).

The log relay (logrelay.py) writes the files and rotates them by renaming `.log` to `.log.1`;
this side only reads, from another process, so it relies on what a rename keeps: an open
descriptor still reads the file it was opened on, wherever the file is now, and the inode
number tells which file is which. A follower reads its file to the end, and only then — when
the live name points to another inode — moves on to the files that came after it, in order: no
line lost or read twice across rotations, however many happened between two looks (as long as
the files were not yet dropped beyond the backups kept).

Lines come back as core.logs.LogEntry, parsed from the stored format (logformat).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import datetime
from io import BufferedReader
from pathlib import Path

import structlog

from opmasd.core.logs import LogEntry, LogStream
from opmasd.runtime import logformat

log = structlog.get_logger(__name__)

# tail reads a file backwards in blocks of this size.
_TAIL_BLOCK = 64 * 1024
# follow yields an unterminated "line" once it grows past the longest line the relay stores.
_MAX_PARTIAL_LINE = logformat.PREFIX_LEN + logformat.MAX_TEXT + 1
# follow reads at most this much per look, so one look is short.
_FOLLOW_CHUNK = 1024 * 1024
# Opening the live file and its backups is retried when a rotation ran in the middle.
_OPEN_ATTEMPTS = 10

_STREAMS = {
    logformat.STDOUT: LogStream.STDOUT,
    logformat.STDERR: LogStream.STDERR,
    logformat.OPMASD: LogStream.OPMASD,
}


def parse_entry(raw: bytes) -> LogEntry:
    """A stored line as a LogEntry; a line not in the format is all text, stream unknown."""
    stamp, tag, text = logformat.parse_line(raw)
    decoded = text.decode("utf-8", "replace")
    if stamp is None or tag is None:
        return LogEntry(decoded)
    try:
        when: datetime | None = datetime.fromisoformat(stamp)
    except ValueError:
        when = None
    return LogEntry(decoded, _STREAMS[tag], when)


class AgentLogs:
    """The log files of all agents in one directory (read-only)."""

    def __init__(self, directory: Path, *, max_bytes: int, backups: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"log max_bytes must be positive, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"log backups must be >= 0, got {backups}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.backups = backups

    def path(self, agent_id: str) -> Path:
        """The live log file of an agent. ValueError for an id that cannot be a file name."""
        return logformat.log_path(self.directory, agent_id)

    def backup(self, agent_id: str, number: int) -> Path:
        return logformat.backup_path(self.directory, agent_id, number)

    def _paths(self, agent_id: str) -> list[Path]:
        """Newest first: the live file, `.1`, `.2` … (one more than kept: a cap just lowered)."""
        return [self.path(agent_id), *(self.backup(agent_id, n) for n in range(1, self.backups + 2))]

    def tail(self, agent_id: str, lines: int) -> list[LogEntry]:
        """The last `lines` lines, continuing into the backups when the live file is short.

        [] when the agent has no log. Blocking file I/O: call it from a worker thread.
        """
        if lines <= 0:
            return []
        found: list[bytes] = []
        files = _open_consistent(self._paths(agent_id))
        try:
            for file in files:
                wanted = lines - len(found)
                if wanted <= 0:
                    break
                found = _last_lines(file, wanted) + found
        finally:
            for file in files:
                file.close()
        return [parse_entry(line) for line in found]

    def follow(self, agent_id: str, poll_interval: float = 0.2) -> AsyncIterator[LogEntry]:
        """Lines appended after this call, as they come, until the consumer stops.

        The starting point (the end of the live file) is taken now, not at the first iteration,
        so nothing written between the call and the first `anext` is missed.
        """
        follower = _Follower(self._paths(agent_id))
        return _follow(follower, poll_interval)


async def _follow(follower: _Follower, poll_interval: float) -> AsyncIterator[LogEntry]:
    try:
        while True:
            lines, more = await asyncio.to_thread(follower.read)
            for line in lines:
                yield parse_entry(line)
            if not more:
                await asyncio.sleep(poll_interval)
    finally:
        follower.close()


class _Follower:
    """Where a follower is: the file it reads (by descriptor), and the files queued after it."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._queue: list[BufferedReader] = []
        self._current: BufferedReader | None = _open(paths[0])
        if self._current is not None:
            self._current.seek(0, os.SEEK_END)
        self._pending = b""

    def read(self) -> tuple[list[bytes], bool]:
        """Complete lines read now, and whether more is waiting already."""
        if self._current is None:
            self._current = _open(self._paths[0])  # no log yet: from its beginning once there
            if self._current is None:
                return [], False
        chunk = self._current.read(_FOLLOW_CHUNK)
        if chunk:
            return self._split(chunk), len(chunk) >= _FOLLOW_CHUNK or bool(self._queue)
        if self._queue:
            self._next()
            return self._end_of_file(), True
        if self._rotated():
            self._queue = self._successors()
            return [], True
        return [], False

    def _split(self, chunk: bytes) -> list[bytes]:
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        if len(self._pending) > _MAX_PARTIAL_LINE:
            complete.append(self._pending)
            self._pending = b""
        return complete

    def _end_of_file(self) -> list[bytes]:
        """What is left of a file done with: an unterminated last line is a line."""
        rest, self._pending = self._pending, b""
        return [rest] if rest else []

    def _next(self) -> None:
        if self._current is not None:
            self._current.close()
        self._current = self._queue.pop(0)

    def _rotated(self) -> bool:
        assert self._current is not None
        try:
            live = os.stat(self._paths[0]).st_ino
        except FileNotFoundError:
            return False  # mid-rotation: look again next time
        return live != os.fstat(self._current.fileno()).st_ino

    def _successors(self) -> list[BufferedReader]:
        """The files written after ours, oldest first, ending with the live one."""
        assert self._current is not None
        ours = os.fstat(self._current.fileno()).st_ino
        files = _open_consistent(self._paths)  # newest first
        newer: list[BufferedReader] = []
        for file in files:
            if os.fstat(file.fileno()).st_ino == ours:
                break
            newer.append(file)
        else:
            log.debug("a followed log was dropped before it was read to the end", path=str(self._paths[0]))
        for file in files[len(newer) :]:
            file.close()
        return list(reversed(newer))

    def close(self) -> None:
        for file in [self._current, *self._queue]:
            if file is not None:
                file.close()
        self._current, self._queue = None, []


def _open(path: Path) -> BufferedReader | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _open_consistent(paths: list[Path]) -> list[BufferedReader]:
    """The files that exist, newest first, opened as one consistent set (each once).

    A rotation while they are opened would make one file appear under two names, or skip one:
    the set is taken again when the live file changed meanwhile.
    """
    files: list[BufferedReader] = []
    for _ in range(_OPEN_ATTEMPTS):
        files = [file for file in map(_open, paths) if file is not None]
        inodes = [os.fstat(file.fileno()).st_ino for file in files]
        try:
            live = os.stat(paths[0]).st_ino
        except FileNotFoundError:
            live = None
        if len(set(inodes)) == len(inodes) and (live is None or (inodes and inodes[0] == live)):
            return files
        for file in files:
            file.close()
    # Rotating faster than we can open: keep what we have, without duplicates.
    files = [file for file in map(_open, paths) if file is not None]
    seen: set[int] = set()
    unique = []
    for file in files:
        inode = os.fstat(file.fileno()).st_ino
        if inode in seen:
            file.close()
        else:
            seen.add(inode)
            unique.append(file)
    return unique


def _last_lines(file: BufferedReader, count: int) -> list[bytes]:
    """The last `count` lines of a file (without their newlines), reading backwards in blocks."""
    blocks: list[bytes] = []
    newlines = 0
    position = file.seek(0, os.SEEK_END)
    # One newline more than lines wanted guarantees `count` complete lines whatever the file
    # ends with (the text before the first newline read may be the middle of a line).
    while position > 0 and newlines <= count:
        step = min(_TAIL_BLOCK, position)
        position -= step
        file.seek(position)
        block = file.read(step)
        blocks.append(block)
        newlines += block.count(b"\n")
    data = b"".join(reversed(blocks))
    if not data:
        return []
    if data.endswith(b"\n"):
        data = data[:-1]
    parts = data.split(b"\n")
    if position > 0:
        parts = parts[1:]  # started mid-line
    return parts[-count:]
