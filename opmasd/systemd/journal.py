"""journald's native protocol: a log entry as KEY=value fields, sent as one datagram.

Native fields (not just a line on stderr) are what lets `journalctl AGENT_ID=x` filter.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any

__all__ = ["JOURNAL_SOCKET", "JournalSocket", "encode_journal_fields", "journal_fields"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"

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


class JournalSocket:
    """The datagram socket to journald; `send` raises OSError when the entry did not get there."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A stuck journald must not freeze the event loop for long; the caller falls back then.
        self._sock.settimeout(1.0)

    def close(self) -> None:
        self._sock.close()

    def send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self.path)
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
            self._sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)
