"""opmasd's side of the log relay: finds or starts it, hands it agents' pipes, keeps spare ends.

The relay (logrelay.py, where the whole scheme and its one uncovered failure are described) is
a process of its own; this link is how the daemon uses it without ever blocking the event loop:
the control socket is non-blocking, messages that cannot be sent at once wait in an outbox
until the socket is writable, and the relay's answers are read by a loop reader.

The link keeps a duplicate of every read end it handed over, and lets go of one only when the
relay says that pipe reached end of file. When the relay goes away, the link starts a new one
and hands it every read end again. Used from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from opmasd.runtime import logwire

log = structlog.get_logger(__name__)

# The size the agents' pipes are given (bounded by /proc/sys/fs/pipe-max-size): what an agent
# can write while no relay drains it (a relay restart) before its writes block.
PIPE_SIZE = 1024 * 1024
# A relay that keeps dying is restarted at most this often.
_RESTART_INTERVAL = 1.0
# The relay's own messages; emptied at a start when it has grown past this.
_ERR_MAX = 1024 * 1024
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Pipes:
    """The stdout and stderr pipes made for one launch: write ends for the child, read ends kept."""

    out_read: int
    out_write: int
    err_read: int
    err_write: int

    def close_write_ends(self) -> None:
        """After the spawn: the child has its own copies. Idempotent."""
        for fd in (self.out_write, self.err_write):
            if fd >= 0:
                os.close(fd)
        self.out_write = self.err_write = -1

    def close(self) -> None:
        """When no child got them. Idempotent."""
        self.close_write_ends()
        for fd in (self.out_read, self.err_read):
            if fd >= 0:
                os.close(fd)
        self.out_read = self.err_read = -1


@dataclass
class _Held:
    """A channel handed to the relay: our spare read ends, and a launch note not yet sent."""

    agent_id: str
    fds: list[int]
    note: str | None = None


class RelayLink:
    def __init__(self, directory: Path, *, max_bytes: int, backups: int) -> None:
        self.directory = directory
        self._max_bytes = max_bytes
        self._backups = backups
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        self._held: dict[str, _Held] = {}
        # ("hello", None), ("attach", key), ("note", {agent, text}) or ("sync", {agent, id})
        # waiting for the socket.
        self._outbox: list[tuple[str, Any]] = []
        self._popen: subprocess.Popen[bytes] | None = None
        self._last_start = -_RESTART_INTERVAL
        self._restart_pending = False
        self._keys = itertools.count()
        self._synced: dict[int, asyncio.Future[None]] = {}
        self._closed = False
        # Told each new relay's PID (runtime.process_scopes moves it out of opmasd's unit).
        self.on_start: Callable[[int], None] | None = None

    # --- what the runtime calls -------------------------------------------------------------

    def pipes(self) -> Pipes:
        """Two new pipes (close-on-exec) sized PIPE_SIZE, for one launch. OSError when out of fds."""
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        try:
            err_read, err_write = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(out_read)
            os.close(out_write)
            raise
        for fd in (out_write, err_write):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(PIPE_SIZE, _pipe_max_size()))
            except OSError as exc:  # over the user's pipe-buffer quota: the default size then
                log.debug("cannot enlarge an agent pipe", error=str(exc))
        return Pipes(out_read, out_write, err_read, err_write)

    def attach(self, agent_id: str, pipes: Pipes, note: str) -> None:
        """Hand the read ends to the relay, `note` to be written before anything read from them."""
        key = f"{agent_id}:{os.getpid()}:{time.time_ns()}:{next(self._keys)}"
        self._held[key] = _Held(agent_id, [pipes.out_read, pipes.err_read], _note_text(note))
        pipes.out_read = pipes.err_read = -1  # ours now
        self._outbox.append(("attach", key))
        self._pump()

    def note(self, agent_id: str, text: str) -> None:
        """A daemon note in the agent's log, after what its pipes hold now."""
        self._outbox.append(("note", {"agent": agent_id, "text": _note_text(text)}))
        self._pump()

    async def sync(self, agent_id: str, timeout: float = 1.0) -> bool:
        """Wait (up to `timeout`) until the relay stored what the agent has written until now, so
        a tail right after an exit has the agent's last lines. False when it did not answer."""
        if self._closed:
            return False
        sync_id = next(self._keys)
        waiter = self._synced[sync_id] = asyncio.get_running_loop().create_future()
        item = ("sync", {"agent": agent_id, "id": sync_id})
        self._outbox.append(item)
        self._pump(start=False)
        if self._sock is None:  # no relay: nothing in flight either
            self._outbox.remove(item)
            self._synced.pop(sync_id, None)
            return False
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            log.debug("the log relay did not confirm a sync in time", agent_id=agent_id, timeout=timeout)
            return False
        finally:
            self._synced.pop(sync_id, None)
        return True

    def check(self) -> None:
        """Periodic: connect to a relay left by an earlier daemon (to hold spare ends again), and
        restart ours if it went away while it had pipes."""
        if self._sock is None and not self._closed:
            if self._held or self._outbox or logwire.socket_path(self.directory).exists():
                self._pump(start=bool(self._held or self._outbox))

    def close(self) -> None:
        """Let go of the relay: it keeps draining the pipes (and exits once they are all done)."""
        self._closed = True
        self._disconnect()
        for held in self._held.values():
            for fd in held.fds:
                os.close(fd)
        self._held.clear()
        self._outbox.clear()
        if self._popen is not None:
            self._popen.poll()  # reaps a relay that is gone; a running one is left to run

    # --- the connection ---------------------------------------------------------------------

    def _pump(self, start: bool = True) -> None:
        """Connect (starting a relay if needed and `start`) and send what the outbox holds."""
        if self._closed:
            return
        if self._sock is None and not self._connect(start):
            return
        self._flush()

    def _connect(self, start: bool) -> bool:
        try:
            sock = _connect_to(logwire.socket_path(self.directory))
        except BlockingIOError:  # a relay is there but its backlog is full: not one to replace
            log.warning("the log relay accepts no connection now; trying later", path=str(self.directory))
            self._restart_later()
            return False
        if sock is None:
            if not start:
                return False
            if time.monotonic() - self._last_start < _RESTART_INTERVAL:
                self._restart_later()
                return False
            try:
                sock = self._start()
            except OSError as exc:
                log.error("cannot start the log relay", directory=str(self.directory), error=str(exc))
                self._restart_later()
                return False
        self._sock = sock
        self._loop = _running_loop()
        if self._loop is not None:
            self._loop.add_reader(sock.fileno(), self._on_readable)
        # The relay learns the settings, then gets every read end we hold (it ignores the ones it
        # has): after a relay restart that is everything; to a running relay it is a no-op.
        notes = [item for item in self._outbox if item[0] in ("note", "sync")]
        self._outbox = [("hello", None), *(("attach", key) for key in self._held), *notes]
        return True

    def _start(self) -> socket.socket:
        """A new relay on a listening socket made here, so we can connect before it runs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_start = time.monotonic()
        path = logwire.socket_path(self.directory)
        temporary = path.with_name(f"{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with logwire.address(temporary) as address:
                listener.bind(address)
            os.chmod(temporary, 0o600)  # not reachable under its final name before this
            listener.listen(16)
            os.replace(temporary, path)
            err_path = self.directory / ".logrelay.err"
            err = os.open(err_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                if os.fstat(err).st_size > _ERR_MAX:
                    os.truncate(err, 0)
                argv = [str(self.directory), str(listener.fileno()), str(self._max_bytes), str(self._backups)]
                # -E -s -S: no environment, user site or site-packages; the relay needs only the
                # standard library and this package, found from cwd. Its own session: not killed
                # with our process group.
                self._popen = subprocess.Popen(
                    [sys.executable, "-E", "-s", "-S", "-m", "opmasd.runtime.logrelay", *argv],
                    cwd=_PACKAGE_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                os.close(err)
            sock = _connect_to(path)  # queued in the backlog until the relay runs
            if sock is None:
                raise OSError(f"the new log relay's socket {path} refuses connections")
        finally:
            listener.close()
        log.info("log relay started", pid=self._popen.pid, directory=str(self.directory))
        if self.on_start is not None:
            self.on_start(self._popen.pid)
        return sock

    def _restart_later(self) -> None:
        if self._restart_pending:
            return
        loop = _running_loop()
        if loop is None:
            return  # check() retries
        self._restart_pending = True

        def again() -> None:
            self._restart_pending = False
            self._pump()

        loop.call_later(_RESTART_INTERVAL, again)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            if self._writing:
                self._loop.remove_writer(sock.fileno())
        self._writing = False
        sock.close()

    def _lost(self, reason: str) -> None:
        """The relay went away: start a new one at once when it had pipes of ours."""
        relay = self._popen.pid if self._popen is not None else None
        self._disconnect()
        if self._popen is not None:
            # Its socket closes a moment before it exits (under load, more than a moment): reaped
            # now or soon, never left a zombie once a new relay takes its place in _popen.
            _reap_soon(self._popen, _running_loop())
            self._popen = None
        self._outbox = [item for item in self._outbox if item[0] in ("note", "sync")]
        restart = bool(self._held or self._outbox)
        log.warning("log relay gone", reason=reason, relay_pid=relay, pipes=len(self._held), restart=restart)
        if restart:
            self._pump()

    def _flush(self) -> None:
        sock = self._sock
        while sock is not None and self._outbox:
            kind, detail = self._outbox[0]
            message, fds = self._message(kind, detail)
            try:
                if message is not None:
                    logwire.send(sock, message, fds)
            except BlockingIOError:
                if not self._writing and self._loop is not None:
                    self._writing = True
                    self._loop.add_writer(sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            self._outbox.pop(0)
            if kind == "attach" and detail in self._held:
                self._held[detail].note = None  # the launch note is written once
        if self._writing and self._loop is not None and sock is not None:
            self._writing = False
            self._loop.remove_writer(sock.fileno())

    def _message(self, kind: str, detail: Any) -> tuple[dict[str, Any] | None, list[int]]:
        if kind == "hello":
            return {"op": "hello", "max_bytes": self._max_bytes, "backups": self._backups}, []
        if kind in ("note", "sync"):
            return {"op": kind, **detail}, []
        held = self._held.get(detail)
        if held is None:
            return None, []  # ended before it could be sent
        message: dict[str, Any] = {"op": "attach", "key": detail, "agent": held.agent_id}
        message["streams"] = ["out", "err"]
        if held.note is not None:
            message["note"] = held.note
        return message, held.fds

    def _on_writable(self) -> None:
        self._flush()

    def _on_readable(self) -> None:
        while self._sock is not None:
            try:
                received = logwire.receive(self._sock)
            except BlockingIOError:
                return
            except (OSError, ValueError) as exc:
                self._lost(f"bad message: {exc}")
                return
            if received is None:
                self._lost("connection closed")
                return
            self._on_message(*received)

    def _on_message(self, message: dict[str, Any], fds: list[int]) -> None:
        op, key = message.get("op"), str(message.get("key"))
        if op == "synced":
            sync_id = message.get("id")
            waiter = self._synced.get(sync_id) if isinstance(sync_id, int) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if op == "channel" and key not in self._held and len(fds) == 2:
            self._held[key] = _Held(str(message.get("agent")), fds)
            return
        if op == "closed" and key in self._held:
            for fd in self._held.pop(key).fds:
                os.close(fd)
        elif op not in ("channel", "closed"):
            log.warning("unknown message from the log relay", op=op)
        for fd in fds:
            os.close(fd)


def _note_text(text: str) -> str:
    return f"--- opmasd: {text} ---"


def _connect_to(path: Path) -> socket.socket | None:
    """A non-blocking connection to a listening relay; None when none listens there.

    BlockingIOError when one listens but its backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        with logwire.address(path) as address:
            sock.connect(address)
    except BlockingIOError:
        sock.close()
        raise
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        log.debug("no log relay to connect to", path=str(path), error=type(exc).__name__)
        sock.close()
        return None
    except OSError as exc:
        log.warning("cannot connect to the log relay", path=str(path), error=str(exc))
        sock.close()
        return None
    return sock


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_pipe_max: int | None = None


def _pipe_max_size() -> int:
    global _pipe_max
    if _pipe_max is None:
        try:
            _pipe_max = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        except (OSError, ValueError):
            _pipe_max = PIPE_SIZE
    return _pipe_max


def _reap_soon(
    popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop | None, tries: int = 50
) -> None:
    """Reap a relay that is exiting: now, or within tries x 0.1 s (then subprocess reaps it at
    the next spawn)."""
    if popen.poll() is None and tries > 0 and loop is not None and not loop.is_closed():
        loop.call_later(0.1, _reap_soon, popen, loop, tries - 1)
