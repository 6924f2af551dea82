"""Which port the embedded nats-server listens on: one only root may bind, where it can.

While nats-server is down (a crash, a restart), another local user could bind its port and
collect the login of every client that reconnects there (opmasd's own, each agent's). No one
but root can bind a port below net.ipv4.ip_unprivileged_port_start, so opmasd, as root, picks
one of those; the port is remembered across restarts, so that agents outliving opmasd find it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# How many privileged ports are tried, from the top of the range down.
PRIVILEGED_PORTS_TRIED = 400


def choose_port(host: str, remembered_in: Path) -> int:
    """Last run's port when it is free (and privileged, where privileged ones can be had); else
    a free privileged port; else -1 (the server picks, with a warning)."""
    privileged = privileged_ports()
    try:
        remembered = int(remembered_in.read_text(encoding="ascii")[:16].strip())
    except (OSError, ValueError):
        remembered = 0
    if 0 < remembered < 65536 and (not privileged or remembered in privileged):
        if port_is_free(host, remembered):
            return remembered
    for port in privileged:
        if port_is_free(host, port):
            return port
    log.warning(
        "the embedded NATS server listens on a port any local user may bind while it is down "
        "(run opmasd as root, with net.ipv4.ip_unprivileged_port_start above 1): a user who "
        "takes it then would see the logins of the clients reconnecting there"
    )
    return -1


def privileged_ports() -> range:
    """The ports only root may bind, if this process is root (else none)."""
    if os.geteuid() != 0:
        return range(0)
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as knob:
            start = int(knob.read(16).strip())
    except (OSError, ValueError):
        start = 1024
    return range(start - 1, max(start - 1 - PRIVILEGED_PORTS_TRIED, 0), -1)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # nats-server itself sets SO_REUSEADDR, so a port in TIME_WAIT is usable by it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
