"""How long a PostgreSQL call may take, and the cutter that ends one past its deadline.

SqlStore bounds every PostgreSQL call (SqlStore._deadline): past its deadline the call's
connection is cut from a timer's thread, so that the call fails instead of waiting forever on
a server that froze without closing its sockets.
"""

from __future__ import annotations

import os
import re
import socket
import threading

import peewee
import psycopg2  # type: ignore[import-untyped]
import structlog

log = structlog.get_logger(__name__)

# How much longer than its statement_timeout a PostgreSQL call may take before its connection
# is cut (see SqlStore._deadline); connecting is bounded by connect_timeout.
CALL_DEADLINE_MARGIN = 2.0
_STATEMENT_TIMEOUT = re.compile(r"statement_timeout=(\d+)(ms|s)?\b")


def call_deadline(database: peewee.Database) -> float:
    """The statement_timeout the connections ask for (database.py sets 10 s unless the URL says
    otherwise), plus a margin; 0 (none) keeps the default."""
    options = str(getattr(database, "connect_params", {}).get("options", ""))
    found = _STATEMENT_TIMEOUT.findall(options)
    seconds = 10.0
    if found:
        value, unit = found[-1]  # the last one given is the one PostgreSQL applies
        seconds = float(value) if unit == "s" else float(value) / 1000
    return (seconds or 10.0) + CALL_DEADLINE_MARGIN


class ConnectionCutter:
    """Shuts down a connection's socket from the timer's thread, unless disarmed first."""

    def __init__(self, connection: object, what: str, url: str, deadline: float) -> None:
        self._connection = connection
        self._what = what
        self._url = url
        self._deadline = deadline
        self._lock = threading.Lock()
        self._armed = True
        self.fired = False

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def __call__(self) -> None:
        with self._lock:
            if not self._armed:
                return
            try:
                fd = self._connection.fileno()  # type: ignore[attr-defined]
                # A duplicate of the descriptor: shutting it down ends the connection for the
                # thread blocked on it, and closing the duplicate leaves the original to psycopg2.
                with socket.socket(fileno=os.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                self.fired = True
            except (OSError, psycopg2.Error) as exc:
                log.warning("could not cut a database call past its deadline", error=str(exc))
                return
        log.error(
            "database call past its deadline: connection cut",
            url=self._url,
            operation=self._what,
            deadline=self._deadline,
        )
