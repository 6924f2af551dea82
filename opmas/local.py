"""Where a local opmasd keeps its runtime files and gRPC socket, read from the environment.

One rule for both sides: the daemon binds its socket here when its configuration names neither
a socket nor a service.runtime_dir, and opmasctl looks here when that configuration names no
other place (opmasctl/connection.py has the whole order; --server or $OPMAS_SERVER overrides it).

A user with no $XDG_RUNTIME_DIR falls back to /tmp/opmas-<uid>, a name anybody may take first in
/tmp: the daemon refuses one that is not its user's own (opmasd.directories), and
fallback_runtime_dir_problem says why a client should not trust one either.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DEFAULT_TCP_ADDRESS",
    "SOCKET_NAME",
    "SYSTEM_RUNTIME_DIR",
    "default_runtime_dir",
    "default_socket_path",
    "fallback_runtime_dir",
    "fallback_runtime_dir_problem",
    "systemd_directory",
    "xdg_directory",
]

SOCKET_NAME = "opmasd.sock"
# The TCP listener of a daemon whose configuration names none, and opmasctl's last resort.
DEFAULT_TCP_ADDRESS = "127.0.0.1:50051"
SYSTEM_RUNTIME_DIR = Path("/run/opmas")  # RuntimeDirectory=opmas of the shipped unit


def systemd_directory(env: Mapping[str, str], name: str) -> Path | None:
    """$STATE_DIRECTORY, $RUNTIME_DIRECTORY, ... as systemd sets them, or None when unset."""
    # systemd passes colon-separated absolute paths, one per directory in the unit; ours is first.
    first = env.get(name, "").split(":")[0]
    return Path(first) if first else None


def xdg_directory(env: Mapping[str, str], name: str) -> Path | None:
    """$XDG_RUNTIME_DIR, $XDG_STATE_HOME, ... or None when unset or relative."""
    # The XDG spec says relative values are invalid and must be ignored.
    value = env.get(name, "")
    return Path(value) if value.startswith("/") else None


def default_runtime_dir(env: Mapping[str, str], euid: int | None = None) -> Path:
    """systemd's RuntimeDirectory=, else /run/opmas for root, else the user's runtime dir."""
    euid = os.geteuid() if euid is None else euid
    runtime = systemd_directory(env, "RUNTIME_DIRECTORY")
    if runtime is not None:
        return runtime
    if euid == 0:
        return SYSTEM_RUNTIME_DIR
    xdg_runtime = xdg_directory(env, "XDG_RUNTIME_DIR")
    # The effective uid, as the daemon creating the directory sees itself.
    return xdg_runtime / "opmas" if xdg_runtime else fallback_runtime_dir(euid)


def fallback_runtime_dir(euid: int) -> Path:
    """The runtime directory of a user with no $XDG_RUNTIME_DIR (nor systemd's)."""
    return Path(f"/tmp/opmas-{euid}")


def fallback_runtime_dir_problem(path: Path, euid: int) -> str | None:
    """Why the user `euid` must not trust `path` (fallback_runtime_dir, where any user may
    have made it first): not a directory (a symlink counts as not), another user's, or one
    others may write. None when it is missing (the daemon makes it, atomically, when it starts)
    or the user's own and not writable by group or others (0700, or 0750 as the daemon makes it
    so that a socket group may reach it)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory (a symlink, or a file): remove it"
    if info.st_uid != euid:
        return f"{path} is owned by uid {info.st_uid}, not uid {euid}: remove it, or set XDG_RUNTIME_DIR"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} has mode {mode:04o}: others may write it: chmod go-w {path}, or remove it"
    return None


def default_socket_path(env: Mapping[str, str], euid: int | None = None) -> Path:
    """The gRPC unix socket a daemon running with this environment and euid binds by default."""
    return default_runtime_dir(env, euid) / SOCKET_NAME
