"""Opening one of opmasd's own files where another user might have planted something else.

opmasd often runs as root and writes into directories an operator chose: a symlink planted
where its file should be would make it write (or chmod) wherever the link points, and a FIFO
would hang the open for ever. So its files are opened never through a symlink (O_NOFOLLOW),
without blocking (O_NONBLOCK, cleared again after), and only when what was opened is a
regular file. Each caller turns NotOwnFileError into its own layer's error.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotOwnFileError(OSError):
    """A symlink (`symlink` is its target, or "" when unreadable) or something other than a
    regular file (`symlink` is None; `found` says what) where opmasd's file should be."""

    def __init__(self, path: Path, symlink: str | None, found: str = "") -> None:
        self.path = path
        self.symlink = symlink
        self.found = found
        if symlink is not None:
            target = f" -> {symlink}" if symlink else ""
            why = f"refusing to follow a symlink: {path}{target}"
        else:
            why = f"refusing to use {path}: not a regular file ({found})"
        super().__init__(errno.ELOOP if symlink is not None else errno.EINVAL, why)

    def __str__(self) -> str:
        return str(self.strerror)


def open_own_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open(path, flags, mode), never through a symlink and only onto a regular file;
    NotOwnFileError otherwise, any other OSError as os.open raised it. The descriptor is
    close-on-exec and blocking."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        try:
            target = os.readlink(path)
        except OSError:
            target = ""
        raise NotOwnFileError(path, target) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotOwnFileError(path, None, _kind(info.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"
