"""The daemon's own directories and files, private to it with or without systemd.

Every agent's spec and environment is in the database, its output in the log directory and
the embedded NATS server's files in the state directory: none of it is anyone else's to read.
opmasd runs with a umask of at least 027 (what the shipped unit sets), makes its state,
runtime and log directories 0750 or tighter (tightening ones an earlier version left open),
gives the runtime directory the sockets' group (its members must reach the sockets in it), and
keeps the SQLite database 0600 (store.database).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

UMASK = 0o027
DIRECTORY_MODE = 0o750


def tighten_umask() -> None:
    """At least UMASK: what opmasd and the agents it starts create is not world-readable."""
    os.umask(os.umask(UMASK) | UMASK)


def prepare(directories: Iterable[Path], runtime_dir: Path, runtime_gid: int | None) -> None:
    """Make the directories (0750), tighten those that are looser and ours, and give the runtime
    directory the sockets' group. OSError when one cannot be made."""
    for directory in directories:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & ~DIRECTORY_MODE:
            mode = stat.S_IMODE(info.st_mode) & DIRECTORY_MODE
            os.chmod(directory, mode)
            log.info("directory made private", path=str(directory), mode=f"{mode:04o}")
    if runtime_gid is not None and runtime_dir.stat().st_gid != runtime_gid:
        os.chown(runtime_dir, -1, runtime_gid)
