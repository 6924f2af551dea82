"""The daemon's directories and database are private to it (issue: every agent's spec and
environment was world-readable outside systemd)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from opmasd import directories
from opmasd.store.database import database_from_url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_directories_are_made_0750_and_loose_ones_tightened(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    os.chmod(old, 0o777)
    tight = tmp_path / "tight"
    tight.mkdir()
    os.chmod(tight, 0o700)
    new = tmp_path / "a" / "new"
    directories.prepare((old, tight, new), new, None)
    assert (mode(old), mode(tight), mode(new)) == (0o750, 0o700, 0o750)


def test_the_runtime_directory_gets_the_sockets_group(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    gid = os.getgroups()[-1] if os.getgroups() else os.getegid()
    directories.prepare((runtime,), runtime, gid)
    assert runtime.stat().st_gid == gid


def test_the_umask_is_tightened_never_loosened() -> None:
    saved = os.umask(0o022)
    try:
        directories.tighten_umask()
        assert os.umask(0o077) == 0o027
        directories.tighten_umask()
        assert os.umask(saved) == 0o077
    finally:
        os.umask(saved)


def test_the_sqlite_database_is_0600_new_or_old(tmp_path: Path) -> None:
    saved = os.umask(0o000)  # what a careless parent process may hand down
    try:
        fresh = tmp_path / "fresh.db"
        database_from_url(f"sqlite:///{fresh}").connect()
        assert mode(fresh) == 0o600
        old = tmp_path / "old.db"
        old.write_bytes(b"")
        os.chmod(old, 0o644)
        wal = tmp_path / "old.db-wal"
        wal.write_bytes(b"")
        os.chmod(wal, 0o644)
        database_from_url(f"sqlite:///{old}")
        assert (mode(old), mode(wal)) == (0o600, 0o600)
    finally:
        os.umask(saved)


def test_our_own_0755_directories_are_tightened_to_0750(tmp_path: Path) -> None:
    ours = tmp_path / "state"
    ours.mkdir()
    os.chmod(ours, 0o755)
    fresh = tmp_path / "fresh" / "run"
    directories.prepare((ours, fresh), fresh, None)
    assert (mode(ours), mode(fresh)) == (0o750, 0o750)
