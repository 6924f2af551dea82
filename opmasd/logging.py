"""structlog setup: console, JSON lines, or journald's native protocol, all on stderr's behalf.

The journald side of the wire is opmasd.systemd.journal; here is only the choice of format and
the fallback to stderr when journald cannot be reached.

stdlib `logging` (grpc, nats, peewee log through it) is fed into the same structlog pipeline,
so one process writes one format whatever library the line came from.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from opmasd.systemd.journal import JOURNAL_SOCKET, JournalSocket, encode_journal_fields, journal_fields

__all__ = [
    "FORMATS",
    "LEVELS",
    "JournalRenderer",
    "configure_logging",
    "resolve_format",
]

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("auto", "console", "json", "journal")


def _text(rendered: object) -> str:
    return rendered.decode("utf-8", "replace") if isinstance(rendered, bytes) else str(rendered)


class JournalRenderer:
    """Final processor: sends the event to journald and drops it from the stderr path.

    When the send fails the event is rendered by `fallback` and written to stderr instead, and
    the failure itself is reported once per outage (not once per line).
    """

    def __init__(self, socket_path: str = JOURNAL_SOCKET, fallback: Processor | None = None) -> None:
        self._journal = JournalSocket(socket_path)
        self._fallback: Processor = fallback or structlog.processors.JSONRenderer()
        self._lock = threading.Lock()
        self._failing = False

    def close(self) -> None:
        self._journal.close()

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
        payload = encode_journal_fields(journal_fields(event_dict))
        try:
            with self._lock:
                self._journal.send(payload)
        except OSError as exc:
            line = _text(self._fallback(logger, method_name, event_dict))
            if self._failing:
                return line
            self._failing = True
            notice: EventDict = {
                "event": "cannot log to journald, logging to stderr until it is back",
                "socket": self._journal.path,
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

    # One writer for every logger: loggers are bound at each call (not cached, see below), and
    # WriteLoggerFactory makes a writer per bind, which looks up its file's lock each time, a
    # cost paid even by a call the level filters out (a fifth of the manager's CPU stopping 500 agents).
    writer = structlog.WriteLogger(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_args: writer,
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
