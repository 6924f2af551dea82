"""An agent's live log as the relay writes it: capped at the moment of writing, rotated by renaming.

The relay owns the only write descriptor on the file, so a rotation is a rename (`.log` →
`.log.1`, `.1` → `.2` …, the oldest dropped) and a new `.log`: nothing is copied, nothing is lost,
and a reader holding the old file open still reads it to its end. A write that would take the
live file past max_bytes rotates first, after as many whole lines as fit, so the live file never
passes the cap and what is kept never passes max_bytes * (1 + backups). Standard library only
(the relay imports it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from opmasd.runtime import logformat

# Write errors (disk full) are reported at most this often.
_ERROR_INTERVAL = 10.0


def say(text: str) -> None:
    """A line on the relay's stderr (opmasd points it at `<log_dir>/.logrelay.err`)."""
    stamp = logformat.Stamper().stamp().decode()
    sys.stderr.write(f"{stamp} logrelay[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


class Settings:
    """The size cap and the backups kept; the latest opmasd to say hello sets them."""

    def __init__(self, max_bytes: int, backups: int) -> None:
        self.max_bytes = 1
        self.backups = 0
        self.update(max_bytes, backups)

    def update(self, max_bytes: int, backups: int) -> None:
        self.max_bytes = max(1, max_bytes)
        self.backups = max(0, backups)

    @property
    def piece(self) -> int:
        """The longest text of one stored line: a formatted line always fits in an empty file."""
        return max(1, min(logformat.MAX_TEXT, self.max_bytes - logformat.PREFIX_LEN - 1))


class LogFile:
    """One agent's live log: capped when written, rotated by renaming, never copied."""

    def __init__(self, directory: Path, agent_id: str, settings: Settings) -> None:
        self.path = logformat.log_path(directory, agent_id)
        self._directory = directory
        self._agent_id = agent_id
        self._settings = settings
        self._fd: int | None = None
        self._size = 0
        self._last_error = 0.0

    def write(self, data: bytes) -> None:
        """Append stored lines; rotate first whenever they would take the file past the cap."""
        try:
            while data:
                fd = self._open()
                room = self._settings.max_bytes - self._size
                if len(data) <= room:
                    self._put(fd, data)
                    return
                # As many whole lines as fit; a single line longer than the cap is split.
                end = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
                if end == 0 and self._size == 0:
                    end = room
                if end > 0:
                    self._put(fd, data[:end])
                    data = data[end:]
                self._rotate()
        except OSError as exc:
            self.close()
            now = time.monotonic()
            if now - self._last_error > _ERROR_INTERVAL:
                self._last_error = now
                say(f"cannot write {self.path} (output dropped): {exc}")

    def _open(self) -> int:
        if self._fd is None:
            self._directory.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o640)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _put(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        """`.log` → `.log.1` (shifting `.1` → `.2` …, the oldest dropped), then a new `.log`.

        The live name never goes missing, not even for an instant: the old file gets its new
        name as a hard link first, and the new file replaces it under the live name atomically.
        """
        self.close()
        backups = self._settings.backups
        extra = backups + 1  # left from a larger count configured before
        while _unlink(logformat.backup_path(self._directory, self._agent_id, extra)):
            extra += 1
        if backups > 0:
            for number in range(backups - 1, 0, -1):
                older = logformat.backup_path(self._directory, self._agent_id, number)
                if older.exists():
                    os.replace(older, logformat.backup_path(self._directory, self._agent_id, number + 1))
            newest = logformat.backup_path(self._directory, self._agent_id, 1)
            _unlink(newest)
            try:
                os.link(self.path, newest)
            except FileNotFoundError:
                pass  # no live file yet
            except OSError:  # a file system without hard links: a plain rename then
                os.replace(self.path, newest)
        fresh = self.path.with_name(self.path.name + ".new")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._fd = os.open(fresh, flags, 0o640)
        os.replace(fresh, self.path)
        self._size = 0

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
