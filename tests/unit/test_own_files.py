"""open_own_file: opmasd's own files are opened only as regular files, never through a symlink,
and a FIFO planted in their place is refused at once instead of hanging the open."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from opmasd.core.own_files import NotOwnFileError, open_own_file


def test_a_regular_file_is_opened_blocking_and_close_on_exec(tmp_path: Path) -> None:
    fd = open_own_file(tmp_path / "own", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert os.get_blocking(fd) and not os.get_inheritable(fd)
        assert (tmp_path / "own").stat().st_mode & 0o777 == 0o600
    finally:
        os.close(fd)


def test_a_symlink_is_refused_naming_its_target(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc/shadow")
    with pytest.raises(NotOwnFileError) as caught:
        open_own_file(tmp_path / "link", os.O_WRONLY | os.O_CREAT)
    assert str(caught.value) == f"refusing to follow a symlink: {tmp_path / 'link'} -> /etc/shadow"
    assert caught.value.symlink == "/etc/shadow"


@pytest.mark.parametrize("kind", ["a FIFO", "a directory"])
def test_anything_but_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "planted"
    if kind == "a FIFO":
        os.mkfifo(path)  # a blocking open of it for reading would wait for a writer for ever
    else:
        path.mkdir()
    with pytest.raises(NotOwnFileError) as caught:
        open_own_file(path, os.O_RDONLY)
    assert str(caught.value) == f"refusing to use {path}: not a regular file ({kind})"


def test_other_errors_pass_through_unchanged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_own_file(tmp_path / "missing", os.O_RDONLY)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "socket"))
        with pytest.raises(OSError, match="No such device or address"):  # a socket cannot be opened
            open_own_file(tmp_path / "socket", os.O_RDONLY)
