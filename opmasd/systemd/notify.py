"""sd_notify: tell systemd (Type=notify) when we are ready, reloading, stopping, alive.

The datagrams are sent here rather than through sdnotify.SystemdNotifier: that class swallows
every error, connects once at construction (so a socket that is not there yet stays broken
forever) and encodes as latin-1 (a non-latin STATUS= raises inside it and is swallowed too).
The protocol is one datagram of KEY=VALUE lines, which is all this module does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

__all__ = ["SYSTEMD_ENV_VARS", "Notifier"]

log = structlog.get_logger(__name__)

# Variables systemd hands the daemon that describe the daemon's own unit: a child that inherits
# them would talk to systemd as if it were opmasd. Supervisors should drop them from agents' env.
SYSTEMD_ENV_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


class Notifier:
    """Sends notify messages when $NOTIFY_SOCKET is set; otherwise every call is a no-op."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace, whose address starts with NUL.
        self._address: str | None = ("\0" + address[1:] if address.startswith("@") else address) or None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status is not None else ""))

    def reloading(self) -> None:
        # systemd >= 253 wants the reload's monotonic timestamp next to RELOADING=1 and older
        # ones ignore it, so it is always sent.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None  # the watchdog is meant for another process (we were forked or exec'd)
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring invalid WATCHDOG_USEC", value=self._watchdog_usec)
            return None
        if usec <= 0:
            log.warning("ignoring invalid WATCHDOG_USEC", value=self._watchdog_usec)
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A wedged systemd must not freeze the event loop (watchdog pings run on it).
                self._sock.settimeout(1.0)
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            # Logged once per outage: the watchdog pings every few seconds and would flood.
            if not self._failing:
                self._failing = True
                log.warning(
                    "sd_notify failed",
                    socket=self._address.replace("\0", "@"),
                    notification=message.split("\n", 1)[0],
                    error=str(exc),
                )
            return
        if self._failing:
            self._failing = False
            log.info("sd_notify works again", socket=self._address.replace("\0", "@"))


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return " ".join(text.splitlines())
