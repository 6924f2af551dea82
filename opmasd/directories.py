"""The daemon's own directories and files, private to it with or without systemd.

Every agent's spec and environment is in the database, its output in the log directory and
the embedded NATS server's files in the state directory: none of it is anyone else's to read.
opmasd runs with a umask of at least 027 (what the shipped unit sets), makes its state,
runtime and log directories 0750 or tighter (tightening ones an earlier version left open),
gives the runtime directory the sockets' group (its members must reach the sockets in it), and
keeps the SQLite database 0600 (store.database).

Nor may anyone else swap them: opmasd (often root) writes its lock, database, ports and logs
there, and a link planted where one of them goes would have it write wherever the link points.
So a directory opmasd uses, and every directory and symlink on the way to it, must be owned by
opmasd's user or root; a directory on the way may be writable by all only when sticky (/tmp:
nobody else may rename or remove what is ours there), by its group when root or opmasd's user
gave it that group; the directory itself is writable by neither once opmasd tightened it, and
one it may not tighten (not its own, or a shared sticky one) is refused (UnsafePathError).
The files themselves are opened without following a symlink (open_private): a symlink where
one of them should be is refused too.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

import structlog

from opmasd.core.own_files import NotOwnFileError, open_own_file

log = structlog.get_logger(__name__)

UMASK = 0o027
DIRECTORY_MODE = 0o750
# Group or others may create, rename or remove entries in a directory with one of these bits.
_OPEN_TO_OTHERS = stat.S_IWGRP | stat.S_IWOTH
# The kernel's own limit on symlinks followed while resolving one path (MAXSYMLINKS).
_MAX_SYMLINKS = 40


class UnsafePathError(ValueError):
    """A directory or file opmasd would use that another user could write, swap or point
    elsewhere. The message names it, says why, and what to do."""


def tighten_umask() -> None:
    """At least UMASK: what opmasd and the agents it starts create is not world-readable."""
    os.umask(os.umask(UMASK) | UMASK)


def prepare(directories: Iterable[Path], runtime_dir: Path, runtime_gid: int | None) -> None:
    """Make the directories (0750), tighten those that are looser and ours, refuse those another
    user could swap or write (UnsafePathError), and give the runtime directory the sockets'
    group. OSError when one cannot be made."""
    for directory in directories:
        private_directory(directory)
    if runtime_gid is not None and runtime_dir.stat().st_gid != runtime_gid:
        os.chown(runtime_dir, -1, runtime_gid)


def let_through(directory: Path) -> None:
    """Let every user pass through one of opmasd's own directories (o+x: reach a name it holds,
    never list it), for the viewers' socket in it; another's directory is left as it is."""
    try:
        info = directory.stat()
    except FileNotFoundError:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True)
        info = directory.stat()
    if info.st_uid == os.geteuid() and not info.st_mode & stat.S_IXOTH:
        os.chmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IXOTH)
        log.info("directory opened to others for passing through", path=str(directory))


def private_directory(directory: Path) -> None:
    """Make `directory` (0750, and its missing parents); UnsafePathError unless it and every
    directory and symlink on the way to it are root's or opmasd's user's, none of those on the
    way writable by all unless sticky, and it writable by neither group nor others unless it is
    opmasd's own: then that write (and anything beyond 0750) is taken off it."""
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    real, info = _checked(directory)
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == os.geteuid() and mode & ~DIRECTORY_MODE:
        os.chmod(real, mode & DIRECTORY_MODE)
        log.info("directory made private", path=str(directory), mode=f"{mode & DIRECTORY_MODE:04o}")


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open(path, flags, mode) for one of opmasd's own files, never through a symlink
    (core.own_files): UnsafePathError for a symlink, or for anything but a regular file
    (a FIFO or device planted in its place), where the file should be."""
    try:
        return open_own_file(path, flags, mode)
    except NotOwnFileError as exc:
        raise UnsafePathError(f"{exc}; opmasd keeps a file of its own there: {_remedy(exc)}") from None


def _remedy(exc: NotOwnFileError) -> str:
    return (
        "remove the link, or choose another directory"
        if exc.symlink is not None
        else ("remove it, or choose another directory")
    )


# -- the checks ----------------------------------------------------------------------------------


def _checked(directory: Path) -> tuple[Path, os.stat_result]:
    """The directory's real path and lstat once every entry on the way to it passed; one of
    opmasd's own open to others passes, to be tightened by the caller."""
    me = os.geteuid()
    entries, real = _walk(directory)
    for entry, info in entries:
        if info.st_uid not in (me, 0):
            raise UnsafePathError(_owner_message(directory, entry, info))
        # On the way: a directory root or opmasd's user gave its group is the admin's choice
        # (/var/log is root:syslog 0775 on Ubuntu); one anybody may write must be sticky.
        on_the_way = entry != real and stat.S_ISDIR(info.st_mode)
        if on_the_way and info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise UnsafePathError(_open_message(directory, entry, info))
    info = entries[-1][1] if entries[-1][0] == real else os.lstat(real)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{directory} is not a directory ({_describe(info)})")
    if info.st_mode & _OPEN_TO_OTHERS:
        # Tightened below when it is opmasd's own, but never a shared one like /tmp.
        shared = info.st_mode & stat.S_ISVTX
        if shared or info.st_uid != me:
            raise UnsafePathError(_open_message(directory, real, info))
    return real, info


def _walk(path: Path) -> tuple[list[tuple[Path, os.stat_result]], Path]:
    """Every entry the kernel looks up to reach `path` ("/" first), each with its lstat and
    named by a path free of symlinks but for its last component, following symlinks as the
    kernel does; and the real path `path` ends at."""
    root = Path("/")
    entries = [(root, os.lstat(root))]
    current = root
    todo = list((path if path.is_absolute() else Path.cwd() / path).parts[1:])
    links = 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        entry = current / name
        info = os.lstat(entry)
        entries.append((entry, info))
        if not stat.S_ISLNK(info.st_mode):
            current = entry
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
        target = Path(os.readlink(entry))
        if target.is_absolute():
            current = root
        todo[:0] = target.parts[1:] if target.is_absolute() else target.parts
    return entries, current


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _name(uid: int) -> str:
    """The user's name for a command line (chown NAME), else the uid."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _describe(info: os.stat_result) -> str:
    return f"owned by {_user(info.st_uid)}, mode {stat.S_IMODE(info.st_mode):04o}"


def _what(directory: Path, entry: Path, info: os.stat_result) -> str:
    kind = "symlink" if stat.S_ISLNK(info.st_mode) else "directory"
    return f"{kind} {entry}" + ("" if entry == directory else f" (on the way to {directory})")


def _owner_message(directory: Path, entry: Path, info: os.stat_result) -> str:
    me = os.geteuid()
    whose = "root's" if me == 0 else f"{_name(me)}'s (opmasd's user) or root's"
    return (
        f"refusing to use {_what(directory, entry, info)}: {_describe(info)}; that user could "
        f"swap or write what opmasd, running as {_user(me)}, keeps there: make it {whose} "
        f"(chown {_name(me)} {entry}), or choose another directory"
    )


def _open_message(directory: Path, entry: Path, info: os.stat_result) -> str:
    if entry == directory and info.st_mode & stat.S_ISVTX:
        advice = "it is a shared one (sticky, like /tmp): choose a directory of opmasd's own"
    else:
        advice = f"take their write access away (chmod go-w {entry}), or choose another directory"
    return (
        f"refusing to use {_what(directory, entry, info)}: {_describe(info)}; other users could "
        f"swap or write what opmasd keeps there: {advice}"
    )
