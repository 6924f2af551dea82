"""Per-agent log files: the file an agent writes to, size-capped rotation, tail and follow.

An agent's stdout and stderr go straight to `<dir>/<agent_id>.log`, opened with O_APPEND by the
daemon and inherited by the child. No pipe runs through the daemon, so the agent keeps writing
when the daemon dies and a restarted daemon finds the output where it left it.

Because the agent holds its own descriptor on the file, the file cannot be renamed away to
rotate it (the agent would keep writing into the renamed file). Rotation is therefore
copytruncate: copy the file to `.1` and empty it in place. O_APPEND makes the agent's next write
land at the new end instead of at its old offset (which would leave a hole of zeros).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# tail reads the file backwards in blocks of this size.
_TAIL_BLOCK = 64 * 1024
# follow yields an unterminated "line" in pieces once it grows past this, so a program that
# never writes a newline cannot make the follower buffer without bound.
_MAX_PARTIAL_LINE = 64 * 1024
# follow reads at most this much per look, so one look never holds the lock for long.
_FOLLOW_CHUNK = 1024 * 1024


@dataclass
class _Cursor:
    """Where a follower has read up to, and which rotation of the file that position is in."""

    position: int
    rotations: int


class AgentLogs:
    """The log files of all agents in one directory.

    Rotation runs in a worker thread (copying a large file should not block the event loop);
    tail and follow read under the same lock, so they never see a rotation half done.
    """

    def __init__(self, directory: Path, *, max_bytes: int, backups: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"log max_bytes must be positive, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"log backups must be >= 0, got {backups}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        # Rotations done per agent: a follower compares it with its own count to notice one.
        self._rotations: dict[str, int] = {}

    def path(self, agent_id: str) -> Path:
        """The current log file of an agent. ValueError for an id that cannot be a file name."""
        if not agent_id or "/" in agent_id or "\0" in agent_id or agent_id in (".", ".."):
            raise ValueError(f"agent id {agent_id!r} cannot name a log file")
        return self.directory / f"{agent_id}.log"

    def backup(self, agent_id: str, number: int) -> Path:
        return self.directory / f"{agent_id}.log.{number}"

    def open_for_child(self, agent_id: str) -> int:
        """A write-only O_APPEND descriptor on the agent's log, to hand to its process.

        O_CLOEXEC keeps it out of other children spawned meanwhile; the dup onto the child's
        stdout/stderr clears the flag there. The caller closes it after the spawn.
        """
        path = self.path(agent_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write_note(self, fd: int, text: str) -> None:
        """Write a `--- opmasd: ... ---` line, so operators see launches and exits in the log.

        A failure (disk full) is logged and otherwise ignored: the note is a courtesy, not a
        reason to fail a launch.
        """
        try:
            os.write(fd, f"--- opmasd: {text} ---\n".encode())
        except OSError as exc:
            log.warning("could not write a note into an agent log", fd=fd, error=str(exc))

    def note(self, agent_id: str, text: str) -> None:
        """write_note for an agent whose log is not open in the daemon."""
        try:
            fd = self.open_for_child(agent_id)
        except (OSError, ValueError) as exc:
            log.warning("could not open an agent log for a note", agent_id=agent_id, error=str(exc))
            return
        try:
            self.write_note(fd, text)
        finally:
            os.close(fd)

    # --- rotation ---------------------------------------------------------------------------

    def rotate_oversized(self) -> list[str]:
        """Rotate every `*.log` in the directory that is over max_bytes; the agents rotated.

        Logs of agents without a running process are rotated too: the directory is the truth.
        """
        rotated: list[str] = []
        for path in sorted(self.directory.glob("*.log")):
            agent_id = path.name.removesuffix(".log")
            try:
                if path.stat().st_size <= self.max_bytes:
                    continue
                self.rotate(agent_id)
            except (OSError, ValueError) as exc:
                log.warning("log rotation failed", agent_id=agent_id, path=str(path), error=str(exc))
                continue
            rotated.append(agent_id)
        return rotated

    def rotate(self, agent_id: str) -> None:
        """copytruncate: shift `.N-1`→`.N` … `.1`→`.2`, copy the log to `.1`, empty the log.

        Output written between the end of the copy and the truncate is lost: the known price of
        copytruncate, kept small by truncating right after reading to the end.
        """
        current = self.path(agent_id)
        with self._lock:
            if self.backups > 0:
                for number in range(self.backups - 1, 0, -1):
                    older = self.backup(agent_id, number)
                    if older.exists():
                        os.replace(older, self.backup(agent_id, number + 1))
                with current.open("rb") as source, self.backup(agent_id, 1).open("wb") as target:
                    shutil.copyfileobj(source, target, 1024 * 1024)
            os.truncate(current, 0)
            self._rotations[agent_id] = self._rotations.get(agent_id, 0) + 1
        log.info("agent log rotated", agent_id=agent_id, backups=self.backups)

    # --- reading ----------------------------------------------------------------------------

    def tail(self, agent_id: str, lines: int) -> list[str]:
        """The last `lines` lines, continuing into the backups when the current file is short.

        [] when the agent has no log. Blocking file I/O: call it from a worker thread.
        """
        if lines <= 0:
            return []
        paths = [self.path(agent_id), *(self.backup(agent_id, n) for n in range(1, self.backups + 1))]
        found: list[bytes] = []
        with self._lock:
            for path in paths:
                wanted = lines - len(found)
                if wanted <= 0:
                    break
                found = _last_lines(path, wanted) + found
        return [line.decode("utf-8", "replace") for line in found]

    def follow(self, agent_id: str, poll_interval: float = 0.2) -> AsyncIterator[str]:
        """Complete lines appended after this call, as they come, until the consumer stops.

        The starting point is taken now, not at the first iteration, so nothing written between
        the call and the first `anext` is missed. The file is polled (a stat every
        `poll_interval`); a rotation is noticed and the rest of the old content read from `.1`.
        """
        path = self.path(agent_id)
        with self._lock:
            cursor = _Cursor(_size(path), self._rotations.get(agent_id, 0))
        return self._follow(agent_id, path, cursor, poll_interval)

    async def _follow(
        self, agent_id: str, path: Path, cursor: _Cursor, poll_interval: float
    ) -> AsyncIterator[str]:
        pending = b""
        while True:
            # The read runs in a thread: it may wait for the lock while a rotation copies.
            chunk = await asyncio.to_thread(self._read_new, agent_id, path, cursor)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.decode("utf-8", "replace")
                if len(pending) > _MAX_PARTIAL_LINE:
                    yield pending.decode("utf-8", "replace")
                    pending = b""
                if len(chunk) >= _FOLLOW_CHUNK:
                    continue  # more is waiting: read it before sleeping
            await asyncio.sleep(poll_interval)

    def _read_new(self, agent_id: str, path: Path, cursor: _Cursor) -> bytes:
        with self._lock:
            data = b""
            rotations = self._rotations.get(agent_id, 0)
            if rotations != cursor.rotations:
                # What we had not read yet went into .1 (when exactly one rotation happened and
                # there are backups); the current file starts again at zero.
                if rotations == cursor.rotations + 1 and self.backups > 0:
                    data = _read_range(self.backup(agent_id, 1), cursor.position, None)
                cursor.position, cursor.rotations = 0, rotations
            if _size(path) < cursor.position:
                cursor.position = 0  # truncated by someone other than us
            new = _read_range(path, cursor.position, _FOLLOW_CHUNK)
            cursor.position += len(new)
            return data + new


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_range(path: Path, start: int, limit: int | None) -> bytes:
    """Up to `limit` bytes (all when None) from `start`; b"" when the file does not exist."""
    try:
        with path.open("rb") as file:
            file.seek(start)
            return file.read(-1 if limit is None else limit)
    except FileNotFoundError:
        return b""


def _last_lines(path: Path, count: int) -> list[bytes]:
    """The last `count` lines of a file (without their newlines), reading backwards in blocks."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return []
    blocks: list[bytes] = []
    newlines = 0
    with file:
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
