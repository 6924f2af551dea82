"""structlog setup: console, JSON lines, or journald's native protocol, all on stderr's behalf.

stdlib `logging` (grpc, nats, peewee log through it) is fed into the same structlog pipeline,
so one process writes one format whatever library the line came from.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "FORMATS",
    "JOURNAL_SOCKET",
    "LEVELS",
    "JournalRenderer",
    "configure_logging",
    "encode_journal_fields",
    "journal_fields",
    "resolve_format",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("auto", "console", "json", "journal")

# structlog method name -> syslog priority, which is what journald's PRIORITY= holds.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
# Keys that become PRIORITY= or are stamped by journald itself: sending them again is noise.
_NOT_FIELDS = frozenset({"event", "level", "timestamp", "exception"})
_RESERVED = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"})


def _field_name(key: str) -> str | None:
    """A journald field name: [A-Z0-9_], not starting with '_' (trusted) or a digit, <= 64."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name:
        return None
    if name[0].isdigit():
        name = "F_" + name
    if name in _RESERVED:
        name = "EVENT_" + name
    return name[:64]


def _field_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _logfmt(key: str, value: object) -> str:
    text = _field_value(value)
    return f"{key}={json.dumps(text)}" if not text or re.search(r'[\s="]', text) else f"{key}={text}"


def journal_fields(event_dict: Mapping[str, Any], identifier: str = "opmasd") -> list[tuple[str, str]]:
    """The fields of one journal entry for a structlog event.

    MESSAGE carries the other keys too (`event key=value ...`), since plain `journalctl` shows
    only MESSAGE; each key is also its own field so `journalctl AGENT_ID=x` can filter on it.
    """
    extras = {k: v for k, v in event_dict.items() if k not in _NOT_FIELDS}
    message = str(event_dict.get("event", ""))
    if extras:
        message += " " + " ".join(_logfmt(key, value) for key, value in extras.items())
    if event_dict.get("exception"):
        message += "\n" + str(event_dict["exception"])
    level = str(event_dict.get("level", "info")).lower()
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(_PRIORITY.get(level, 6))),
        ("SYSLOG_IDENTIFIER", identifier),
    ]
    for key, value in extras.items():
        name = _field_name(str(key))
        if name is not None:
            fields.append((name, _field_value(value)))
    return fields


def encode_journal_fields(fields: list[tuple[str, str]]) -> bytes:
    """journald's native datagram: KEY=value lines, or KEY\\n<u64 LE length><bytes>\\n when the
    value holds a newline (which would otherwise end the field early)."""
    parts = []
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def _text(rendered: object) -> str:
    return rendered.decode("utf-8", "replace") if isinstance(rendered, bytes) else str(rendered)


class JournalRenderer:
    """Final processor: sends the event to journald and drops it from the stderr path.

    When the send fails the event is rendered by `fallback` and written to stderr instead, and
    the failure itself is reported once per outage (not once per line).
    """

    def __init__(self, socket_path: str = JOURNAL_SOCKET, fallback: Processor | None = None) -> None:
        self._path = socket_path
        self._fallback: Processor = fallback or structlog.processors.JSONRenderer()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A stuck journald must not freeze the event loop for long; after this the line goes
        # to stderr.
        self._sock.settimeout(1.0)
        self._lock = threading.Lock()
        self._failing = False

    def close(self) -> None:
        self._sock.close()

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self._path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        # Too big for one datagram (long tracebacks): journald accepts a sealed memfd instead,
        # as sd_journal_sendv does.
        fd = os.memfd_create("opmasd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._sock.sendmsg([], rights, 0, self._path)
        finally:
            os.close(fd)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        payload = encode_journal_fields(journal_fields(event_dict))
        try:
            with self._lock:
                self._send(payload)
        except OSError as exc:
            line = _text(self._fallback(logger, method_name, event_dict))
            if self._failing:
                return line
            self._failing = True
            notice: EventDict = {
                "event": "cannot log to journald, logging to stderr until it is back",
                "socket": self._path,
                "error": str(exc),
                "level": "warning",
            }
            return f"{_text(self._fallback(logger, 'warning', notice))}\n{line}"
        self._failing = False
        raise structlog.DropEvent


class _ToStructlog(logging.Handler):
    """Hands stdlib records to structlog, so they share its processors and output."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                event["exc_info"] = record.exc_info
            structlog.get_logger().log(record.levelno, record.getMessage(), **event)
        except Exception:  # logging's own convention: report on stderr, never raise
            self.handleError(record)


def _journal_stream_matches(stream: TextIO, env: Mapping[str, str]) -> bool:
    value = env.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no real descriptor behind the stream (tests, closed)
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:  # closed stream
        return False


def resolve_format(fmt: str, stream: TextIO, env: Mapping[str, str]) -> str:
    """`auto` becomes journal under journald, console on a terminal, json otherwise."""
    if fmt != "auto":
        return fmt
    if _journal_stream_matches(stream, env):
        return "journal"
    return "console" if _isatty(stream) else "json"


_journal: JournalRenderer | None = None  # the live one, closed when reconfigured


def _drop_exc_info_flag(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # `exc_info=False` (callers passing a flag through) would otherwise become a field.
    if event_dict.get("exc_info") is False:
        del event_dict["exc_info"]
    return event_dict


def configure_logging(
    level: str,
    fmt: str,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Set up structlog (and route stdlib logging at WARNING+ into it). Safe to call again,
    e.g. on reload: loggers are not cached, so a new level applies to existing loggers too."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    fmt = resolve_format(fmt, stream, env)

    global _journal
    if _journal is not None:
        _journal.close()
        _journal = None

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _drop_exc_info_flag,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "console":
        # ConsoleRenderer formats exc_info itself (and warns if format_exc_info ran first).
        processors.append(structlog.dev.ConsoleRenderer(colors=_isatty(stream)))
    else:
        processors.append(structlog.processors.format_exc_info)
        if fmt == "json":
            processors.append(structlog.processors.JSONRenderer())
        else:
            _journal = JournalRenderer(journal_socket)
            processors.append(_journal)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        # Not cached: module-level loggers must follow a reconfiguration (SIGHUP changes level).
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    # Libraries are chatty below WARNING; a debug daemon level still shows their warnings only.
    root.setLevel(max(logging.WARNING, LEVELS[level]))
    logging.captureWarnings(True)
