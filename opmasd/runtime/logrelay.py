"""The log relay: a small process of its own that drains agents' stdout/stderr into their logs.

Why a relay. An agent writing straight into its log file cannot have the file renamed under it,
so rotation had to be copytruncate — lossy, and only as frequent as the daemon looked. Writing
the file through the daemon would tie agents to the daemon's life. The relay is the middle:
each agent's stdout and stderr are pipes whose read ends the relay holds; it owns the only
write descriptor on every log, so it caps the live file at the moment of writing (logwriter: a
rotation is a rename, nothing is lost) and records the stream and time of each line
(logformat). It is tiny — one thread, a selector, the standard library only — and outlives the
daemon that started it, in a session of its own. Lines of one stream keep their order; between
stdout and stderr the order is the order the relay read the two pipes (a read at a time).

Who holds what (runtime/logrelay_link.py is the daemon's side):
- opmasd makes the pipes, gives the write ends to the agent, sends the read ends here
  (`attach`) and keeps duplicates of them without reading. If the relay dies the agents'
  writes do not fail (a read end is still open): they fill the pipe, and block only when it is
  full, until opmasd has started a new relay and handed it every read end again.
- If opmasd dies, the relay keeps draining. A restarted opmasd connects and says `hello`; the
  relay answers with duplicates of every read end, so opmasd is the spare holder again.
- Not covered: the relay and opmasd killed together (`kill -9` of both, or of the whole
  cgroup they share). Nobody holds the read ends any more, so the agents get EPIPE (or SIGPIPE)
  on their next write; output that was in the pipes is lost. A restarted opmasd re-adopts the
  agents but cannot give them a new stdout.
- Killed alone, the relay loses at most what it had read and not yet written (one read).

The relay exits by itself once it drains no pipe and no opmasd is connected. Its own errors go
to its stderr (opmasd points it at `<log_dir>/.logrelay.err`).
"""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opmasd.runtime import logformat, logwire
from opmasd.runtime.logwriter import LogFile, Settings, say

# One read takes up to this much from a pipe (the pipes are enlarged to 1 MiB).
_READ_SIZE = 1024 * 1024
# A note or a sync reads each of the agent's pipes at most this many times first.
_DRAIN_READS = 4
# A relay nobody ever connected to (opmasd died right after starting it) gives up after this.
_STARTUP_GRACE = 3.0


class Stream:
    """One pipe of an agent: its read end and the unterminated line read from it so far."""

    def __init__(self, fd: int, tag: bytes) -> None:
        self.fd = fd
        self.tag = tag
        self.partial = b""


class Channel:
    """The pipes of one launch of an agent (stdout and stderr), known by a key opmasd chose."""

    def __init__(self, key: str, agent_id: str, streams: list[Stream]) -> None:
        self.key = key
        self.agent_id = agent_id
        self.streams = streams


class Controller:
    """A connected opmasd, and what is waiting to be sent to it (the relay never blocks on it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # (message, our own duplicates of the descriptors to send, closed once sent).
        self.outbox: list[tuple[dict[str, Any], list[int]]] = []


class Relay:
    def __init__(self, directory: Path, listener: socket.socket, settings: Settings) -> None:
        self.directory = directory
        self.settings = settings
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._channels: dict[str, Channel] = {}
        self._files: dict[str, LogFile] = {}
        self._controllers: dict[int, Controller] = {}
        self._stamper = logformat.Stamper()
        self._ever_connected = False
        self._started = time.monotonic()

    def run(self) -> int:
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        while True:
            if not (self._channels or self._controllers or not self._idle_long_enough()):
                self._accept(self._listener, 0)  # a connection that came in just now
                if not self._controllers:
                    break
            for key, events in self._selector.select(timeout=1.0):
                key.data(key.fileobj, events)
        self._listener.close()
        for log_file in self._files.values():
            log_file.close()
        return 0

    def _idle_long_enough(self) -> bool:
        return self._ever_connected or time.monotonic() - self._started > _STARTUP_GRACE

    # --- controllers ------------------------------------------------------------------------

    def _accept(self, listener: Any, events: int) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            say(f"accept failed: {exc}")
            return
        # The socket is 0600 already; a peer of another user (but root) is refused all the same.
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, os.getuid()):
            say(f"connection of uid {uid} refused")
            sock.close()
            return
        sock.setblocking(False)
        self._ever_connected = True
        controller = Controller(sock)
        self._controllers[sock.fileno()] = controller
        self._selector.register(sock, selectors.EVENT_READ, self._on_controller)

    def _on_controller(self, sock: Any, events: int) -> None:
        controller = self._controllers.get(sock.fileno())
        if controller is None:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(controller)
        if events & selectors.EVENT_READ:
            while controller.sock.fileno() in self._controllers:
                try:
                    received = logwire.receive(controller.sock)
                except BlockingIOError:
                    return
                except (OSError, ValueError) as exc:
                    say(f"bad message from opmasd, disconnecting it: {exc}")
                    received = None
                if received is None:
                    self._drop(controller)
                    return
                message, fds = received
                self._handle(controller, message, fds)

    def _handle(self, controller: Controller, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        try:
            if op == "attach":
                self._attach(message, fds)
                return
            if op == "hello":
                self.settings.update(int(message["max_bytes"]), int(message["backups"]))
                for channel in self._channels.values():
                    self._queue(controller, _channel_message(channel), [s.fd for s in channel.streams])
            elif op == "note":
                self._note(str(message["agent"]), str(message["text"]))
            elif op == "sync":
                self._drain(str(message["agent"]))
                self._queue(controller, {"op": "synced", "id": message["id"]}, [])
            else:
                say(f"unknown message {op!r} ignored")
        except (KeyError, TypeError, ValueError, OSError) as exc:
            say(f"bad {op!r} message ignored: {exc}")
        for fd in fds:
            os.close(fd)

    def _queue(self, controller: Controller, message: dict[str, Any], fds: list[int]) -> None:
        controller.outbox.append((message, [os.dup(fd) for fd in fds]))
        self._flush(controller)

    def _flush(self, controller: Controller) -> None:
        while controller.outbox:
            message, fds = controller.outbox[0]
            try:
                logwire.send(controller.sock, message, fds)
            except BlockingIOError:
                self._selector.modify(
                    controller.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_controller
                )
                return
            except OSError as exc:
                say(f"opmasd connection lost: {exc}")
                self._drop(controller)
                return
            controller.outbox.pop(0)
            for fd in fds:
                os.close(fd)
        self._selector.modify(controller.sock, selectors.EVENT_READ, self._on_controller)

    def _drop(self, controller: Controller) -> None:
        self._controllers.pop(controller.sock.fileno(), None)
        self._selector.unregister(controller.sock)
        controller.sock.close()
        for _, fds in controller.outbox:
            for fd in fds:
                os.close(fd)
        controller.outbox.clear()

    def _broadcast(self, message: dict[str, Any]) -> None:
        for controller in list(self._controllers.values()):
            self._queue(controller, message, [])

    # --- channels ---------------------------------------------------------------------------

    def _attach(self, message: dict[str, Any], fds: list[int]) -> None:
        key, agent_id, tags = str(message["key"]), str(message["agent"]), list(message["streams"])
        if key in self._channels or len(tags) != len(fds):
            for fd in fds:  # a hand-over again after a relay restart: we have them already
                os.close(fd)
            return
        log_file = self._file(agent_id)  # an id that cannot name a file raises before we keep fds
        note = message.get("note")
        if note:
            log_file.write(self._note_line(str(note)))
        streams = []
        for fd, tag in zip(fds, tags, strict=True):
            os.set_blocking(fd, False)
            stream = Stream(fd, tag.encode()[:3])
            streams.append(stream)
        channel = self._channels[key] = Channel(key, agent_id, streams)
        for stream in streams:
            self._selector.register(stream.fd, selectors.EVENT_READ, self._reader(channel, stream))

    def _file(self, agent_id: str) -> LogFile:
        log_file = self._files.get(agent_id)
        if log_file is None:
            log_file = self._files[agent_id] = LogFile(self.directory, agent_id, self.settings)
        return log_file

    def _reader(self, channel: Channel, stream: Stream) -> Callable[[Any, int], None]:
        def on_readable(fd: Any, events: int) -> None:
            self._read(channel, stream)

        return on_readable

    def _read(self, channel: Channel, stream: Stream) -> bool:
        """One read of a pipe into the log; False when nothing was waiting (or it ended)."""
        try:
            data = os.read(stream.fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            say(f"reading the {stream.tag.decode()} pipe of {channel.agent_id} failed: {exc}")
            data = b""
        log_file = self._file(channel.agent_id)
        if not data:
            if stream.partial:  # a final unterminated line
                self._store(log_file, stream, [stream.partial])
                stream.partial = b""
            self._close_stream(channel, stream)
            return False
        parts = (stream.partial + data).split(b"\n") if stream.partial else data.split(b"\n")
        stream.partial = parts.pop()
        piece = self.settings.piece
        if len(stream.partial) >= piece:
            *whole, stream.partial = logformat.cut(stream.partial, piece)
            if len(stream.partial) == piece:
                whole.append(stream.partial)
                stream.partial = b""
            parts.extend(whole)
        self._store(log_file, stream, parts)
        return True

    def _store(self, log_file: LogFile, stream: Stream, lines: list[bytes]) -> None:
        if not lines:
            return
        piece = self.settings.piece
        if max(map(len, lines)) > piece:
            lines = [part for line in lines for part in logformat.cut(line, piece)]
        log_file.write(logformat.format_lines(self._stamper.prefix(stream.tag), lines))

    def _close_stream(self, channel: Channel, stream: Stream) -> None:
        self._selector.unregister(stream.fd)
        os.close(stream.fd)
        channel.streams.remove(stream)
        if channel.streams:
            return
        del self._channels[channel.key]
        if not any(c.agent_id == channel.agent_id for c in self._channels.values()):
            self._files.pop(channel.agent_id).close()
        self._broadcast({"op": "closed", "key": channel.key})

    def _drain(self, agent_id: str) -> None:
        """Store what the agent's pipes hold now: a read takes a whole pipe's content, so a few
        reads are enough, and an agent that never stops writing cannot keep us here."""
        for channel in [c for c in self._channels.values() if c.agent_id == agent_id]:
            for stream in list(channel.streams):
                for _ in range(_DRAIN_READS):
                    if not self._read(channel, stream):
                        break

    def _note(self, agent_id: str, text: str) -> None:
        """A daemon note, after everything the agent's pipes hold now (its last words first)."""
        self._drain(agent_id)
        log_file = self._file(agent_id)
        log_file.write(self._note_line(text))
        if not any(c.agent_id == agent_id for c in self._channels.values()):
            self._files.pop(agent_id).close()

    def _note_line(self, text: str) -> bytes:
        lines = [line.encode() for line in text.splitlines() or [""]]
        return logformat.format_lines(self._stamper.prefix(logformat.OPMASD), lines)


def _channel_message(channel: Channel) -> dict[str, Any]:
    streams = [s.tag.decode() for s in channel.streams]
    return {"op": "channel", "key": channel.key, "agent": channel.agent_id, "streams": streams}


def _lock(directory: Path) -> int:
    """Hold `.logrelay.lock` for life: a second relay on the same directory waits, then gives up."""
    fd = os.open(directory / ".logrelay.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 2.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    """`logrelay DIR LISTEN_FD MAX_BYTES BACKUPS`: serve the listening socket opmasd made."""
    args = sys.argv[1:] if argv is None else argv
    directory, listen_fd, max_bytes, backups = Path(args[0]), int(args[1]), int(args[2]), int(args[3])
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("opmas-logrelay")
    except OSError:
        pass  # only a nicer name in ps
    os.chdir("/")
    listener = socket.socket(fileno=listen_fd)
    try:
        lock_fd = _lock(directory)  # held (open) until the process ends
    except OSError as exc:
        say(f"another relay holds {directory}/.logrelay.lock, exiting: {exc}")
        return 1
    say(f"started on {directory}")
    code = Relay(directory, listener, Settings(max_bytes, backups)).run()
    say("nothing left to relay, exiting")
    os.close(lock_fd)
    return code


if __name__ == "__main__":
    sys.exit(main())
