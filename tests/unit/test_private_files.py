"""Nobody else may swap opmasd's directories or plant a link where its files go (security
review: a world-writable state directory of another user's, with `opmasd.lock` linked to a
root-owned file, had a root opmasd write its pid over that file).

Run as root, the tests hand directories to `nobody` to play the other user.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from opmas.local import fallback_runtime_dir, fallback_runtime_dir_problem
from opmasd import directories
from opmasd.bus import embedded
from opmasd.core.errors import StoreError
from opmasd.directories import UnsafePathError
from opmasd.instance_lock import InstanceLock
from opmasd.store.database import database_from_url

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files another user's")


@pytest.fixture
def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A root-owned file a planted link points at: it must come out of every test untouched."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    os.chmod(path, 0o644)
    yield path
    assert path.read_text() == "precious\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def given(path: Path, uid: int, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, -1)
    os.chmod(path, mode)
    return path


# -- directories ---------------------------------------------------------------------------------


def test_a_world_writable_state_directory_of_another_user_is_refused(tmp_path: Path, nobody: int) -> None:
    state = given(tmp_path / "x" / "state", nobody, 0o777)
    with pytest.raises(UnsafePathError) as refused:
        directories.prepare((state,), state, None)
    message = str(refused.value)
    assert str(state) in message and "nobody" in message and "0777" in message
    assert "chown" in message and "choose another directory" in message
    assert mode(state) == 0o777  # not ours to change


def test_another_users_directory_is_refused_even_closed(tmp_path: Path, nobody: int) -> None:
    state = given(tmp_path / "state", nobody, 0o755)
    with pytest.raises(UnsafePathError, match="nobody"):
        directories.prepare((state,), state, None)


def test_a_directory_under_one_anybody_may_write_is_refused(tmp_path: Path) -> None:
    shared = given(tmp_path / "shared", 0, 0o777)
    state = shared / "state"
    with pytest.raises(UnsafePathError, match=rf"{shared} \(on the way to {state}\).*0777"):
        directories.prepare((state,), state, None)


def test_a_directory_under_a_sticky_one_is_fine_but_not_the_sticky_one_itself(tmp_path: Path) -> None:
    tmp = given(tmp_path / "tmp", 0, 0o1777)
    state = tmp / "state"
    directories.prepare((state,), state, None)
    assert mode(state) == 0o750
    with pytest.raises(UnsafePathError, match="shared one"):
        directories.prepare((tmp,), tmp, None)


def test_a_symlinked_directory_counts_only_when_the_link_is_ours(tmp_path: Path, nobody: int) -> None:
    real = given(tmp_path / "real", 0, 0o750)
    ours = tmp_path / "ours"
    ours.symlink_to(real)
    directories.prepare((ours,), ours, None)
    theirs = tmp_path / "theirs"
    theirs.symlink_to(real)
    os.lchown(theirs, nobody, -1)
    with pytest.raises(UnsafePathError, match=rf"symlink {theirs}: owned by nobody"):
        directories.prepare((theirs,), theirs, None)


def test_a_link_into_another_users_directory_is_refused(tmp_path: Path, nobody: int) -> None:
    given(tmp_path / "theirs", nobody, 0o755)
    link = tmp_path / "state"
    link.symlink_to(tmp_path / "theirs")
    with pytest.raises(UnsafePathError, match="theirs"):
        directories.prepare((link,), link, None)


# -- files ---------------------------------------------------------------------------------------


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path, victim: Path) -> None:
    state = tmp_path / "state"
    directories.prepare((state,), state, None)
    (state / "opmasd.lock").symlink_to(victim)
    with pytest.raises(UnsafePathError, match=rf"refusing to follow a symlink: {state / 'opmasd.lock'}"):
        InstanceLock(state / "opmasd.lock").acquire()


def test_a_fifo_in_place_of_the_lock_file_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "opmasd.lock")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        InstanceLock(tmp_path / "opmasd.lock").acquire()


def test_the_lock_still_locks(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path / "opmasd.lock")
    lock.acquire()
    try:
        assert (tmp_path / "opmasd.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_a_symlinked_database_is_refused(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "opmas.db").symlink_to(victim)
    with pytest.raises(StoreError, match=rf"refusing to follow a symlink: {tmp_path / 'opmas.db'}"):
        database_from_url(f"sqlite:///{tmp_path / 'opmas.db'}")


def test_a_symlinked_wal_is_neither_chmodded_nor_used(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "opmas.db-wal").symlink_to(victim)
    with pytest.raises(StoreError, match=rf"refusing to follow a symlink: {tmp_path / 'opmas.db-wal'}"):
        database_from_url(f"sqlite:///{tmp_path / 'opmas.db'}")


def test_the_database_is_not_kept_where_another_user_could_swap_it(tmp_path: Path, nobody: int) -> None:
    theirs = given(tmp_path / "theirs", nobody, 0o755)
    with pytest.raises(StoreError, match=rf"{theirs}: owned by nobody"):
        database_from_url(f"sqlite:///{theirs / 'opmas.db'}")
    assert not (theirs / "opmas.db").exists()


def test_the_embedded_nats_files_are_never_written_through_a_link(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "port").symlink_to(victim)
    with pytest.raises(OSError, match=rf"refusing to follow a symlink: {tmp_path / 'port'}"):
        embedded._open_own(tmp_path / "port", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    (tmp_path / "nats-server.pid").symlink_to(victim)
    with pytest.raises(OSError, match="refusing to follow a symlink"):
        embedded._refuse_unsafe(tmp_path, tmp_path / "nats-server.pid")


def test_the_embedded_nats_directory_is_ours_and_closed(tmp_path: Path, nobody: int) -> None:
    loose = given(tmp_path / "loose", 0, 0o777)
    embedded._refuse_unsafe(loose)
    assert mode(loose) == 0o755
    theirs = given(tmp_path / "theirs", nobody, 0o755)
    with pytest.raises(OSError, match="uid 65534"):
        embedded._refuse_unsafe(theirs)


# -- the user's /tmp fallback --------------------------------------------------------------------


def test_the_tmp_fallback_is_trusted_only_when_it_is_the_users_own(tmp_path: Path, nobody: int) -> None:
    assert fallback_runtime_dir(1000) == Path("/tmp/opmas-1000")
    assert fallback_runtime_dir_problem(tmp_path / "missing", nobody) is None
    assert fallback_runtime_dir_problem(given(tmp_path / "own", nobody, 0o700), nobody) is None
    assert fallback_runtime_dir_problem(given(tmp_path / "daemons", nobody, 0o750), nobody) is None
    taken = given(tmp_path / "taken", 0, 0o700)
    assert "owned by uid 0, not uid 65534" in (fallback_runtime_dir_problem(taken, nobody) or "")
    loose = given(tmp_path / "loose", nobody, 0o777)
    assert "mode 0777" in (fallback_runtime_dir_problem(loose, nobody) or "")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "own")
    os.lchown(link, nobody, -1)
    assert "not a directory" in (fallback_runtime_dir_problem(link, nobody) or "")


def test_a_daemon_refuses_a_tmp_fallback_another_user_made_first(tmp_path: Path, nobody: int) -> None:
    tmp = given(tmp_path / "tmp", 0, 0o1777)
    squatted = given(tmp / "opmas-0", nobody, 0o777)
    with pytest.raises(UnsafePathError, match=rf"directory {squatted}: owned by nobody"):
        directories.prepare((squatted,), squatted, None)


# -- the daemon ----------------------------------------------------------------------------------


def test_the_daemon_does_not_start_in_another_users_state_directory(
    tmp_path: Path, nobody: int, victim: Path
) -> None:
    """The review's reproduction, end to end: refused at start, the linked file untouched."""
    state = given(tmp_path / "x" / "state", nobody, 0o777)
    (state / "opmasd.lock").symlink_to(victim)
    os.lchown(state / "opmasd.lock", nobody, -1)
    (tmp_path / "opmasd.yaml").write_text("{}\n")  # not /etc/opmas/opmasd.yaml
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPMAS_")}
    env.update(
        OPMAS_SERVICE_STATE_DIR=str(state),
        OPMAS_SERVICE_RUNTIME_DIR=str(tmp_path / "run"),
        OPMAS_SERVICE_LOG_DIR=str(tmp_path / "log"),
        OPMAS_GRPC_ADDRESS="127.0.0.1:0",
        OPMAS_REST_ENABLED="false",
        OPMAS_CONFIG=str(tmp_path / "opmasd.yaml"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "opmasd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "opmasd could not start" in output and str(state) in output, output
