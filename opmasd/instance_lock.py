"""One opmasd per state directory: a second one would adopt and restart the first one's agents.

An flock on `<state_dir>/opmasd.lock`, held for the daemon's life; the kernel drops it when the
process dies however it dies, so a SIGKILLed daemon leaves no stale lock behind. A symlink (or
anything but a regular file) where the lock file goes is refused (UnsafePathError).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from opmasd.directories import open_private


class AlreadyRunning(Exception):
    pass


class InstanceLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink: one planted here would have opmasd write its pid over its target.
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another opmasd (pid {holder}) is running with state directory {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
