"""Where a local opmasd keeps its runtime files and gRPC socket, read from the environment.

One rule for both sides: the daemon binds its socket here when its configuration names neither
a socket nor a service.runtime_dir, and opmasctl looks here when that configuration names no
other place (opmasctl/connection.py has the whole order; --server or $OPMAS_SERVER overrides it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DEFAULT_TCP_ADDRESS",
    "SOCKET_NAME",
    "SYSTEM_RUNTIME_DIR",
    "default_runtime_dir",
    "default_socket_path",
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
    return xdg_runtime / "opmas" if xdg_runtime else Path(f"/tmp/opmas-{euid}")


def default_socket_path(env: Mapping[str, str], euid: int | None = None) -> Path:
    """The gRPC unix socket a daemon running with this environment and euid binds by default."""
    return default_runtime_dir(env, euid) / SOCKET_NAME
