"""The log relay's control protocol: JSON messages carrying pipe descriptors over a unix socket.

A SOCK_SEQPACKET socket keeps message boundaries, so each message is one JSON object (and the
descriptors sent with it, SCM_RIGHTS). Standard library only: the relay imports it.

opmasd → relay
  hello   {max_bytes, backups}   the file settings; the relay answers with a `channel` for every
                                 pipe it drains, so a restarted opmasd holds spare read ends again
  attach  {key, agent, streams, note?} + one read end per stream ("out", "err"): drain these into
                                 the agent's log; `note` is written first (the launch note)
  note    {agent, text}          write a daemon note, after what the agent's pipes hold now
  sync    {agent, id}            store what the agent's pipes hold now, then answer `synced`
relay → opmasd
  channel {key, agent, streams} + duplicates of the read ends
  closed  {key}                  every stream of the channel reached end of file
  synced  {id}                   the sync of that id is done: a tail now sees all written before
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SOCKET_NAME = ".logrelay.sock"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 8
# sun_path holds 108 bytes; a longer path is reached through a descriptor on its directory.
_MAX_PATH = 100


def socket_path(directory: Path) -> Path:
    return directory / SOCKET_NAME


@contextlib.contextmanager
def address(path: Path) -> Iterator[str]:
    """An address for bind/connect naming `path`, even when the path is too long for sun_path."""
    if len(os.fsencode(path)) <= _MAX_PATH:
        yield str(path)
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"log relay message too large ({len(data)} bytes)")
    return data


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One message; BlockingIOError when the peer's queue is full, OSError when it is gone."""
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors (close-on-exec); None at end of file.

    BlockingIOError when nothing is waiting. ValueError for a message that is not a JSON
    object (its descriptors are closed).
    """
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("truncated message")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds
