"""Socket activation: the listening sockets systemd passes (sd_listen_fds), and REST's among them.

systemd (a .socket unit, or `systemd-socket-activate`) passes listening sockets as fds 3, 4, …
with LISTEN_FDS=<count>, LISTEN_PID=<the pid they are for> and LISTEN_FDNAMES (the units'
FileDescriptorName=, ":"-separated). As sd_listen_fds(3) does, the fds count only when
LISTEN_PID is this process (a child that inherited the variables must not take its parent's
sockets), the variables are unset once read (agents must not inherit them), and the fds are
made close-on-exec (agents must not inherit the sockets either).

Only the REST TCP address can be passed (grpcio cannot serve a socket it did not bind). A passed
socket is recognised by its address, not its name: it must be the configured rest.address (its
IP and port; port 0 there takes any port), and a passed socket that no listener of the
configuration takes is an error at start, never silently left open.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

import structlog

from opmasd.config import ConfigError, RestConfig
from opmasd.config.parsers import split_address

__all__ = ["LISTEN_FDS_START", "PassedSocket", "passed_sockets", "rest_socket"]

log = structlog.get_logger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class PassedSocket:
    sock: socket.socket
    name: str  # FileDescriptorName= ("unknown" when systemd was given none)

    def describe(self) -> str:
        """The socket as an operator would name it in a unit: "127.0.0.1:8000 (fd 3, opmasd.socket)"."""
        return f"{_where(self.sock)} (fd {self.sock.fileno()}, {self.name})"


def passed_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[PassedSocket]:
    """The sockets passed to this process (none when LISTEN_PID is another's); the variables are
    removed from `environ` (os.environ by default) in every case. ValueError: they are malformed."""
    environ = os.environ if environ is None else environ
    count_text, pid_text, names_text = (environ.pop(name, None) for name in _VARIABLES)
    if count_text is None:
        return []
    own_pid = os.getpid() if pid is None else pid
    if pid_text is None or not pid_text.strip().isdigit() or int(pid_text) != own_pid:
        # sd_listen_fds: meant for another process (we inherited them): not ours to take.
        log.warning("LISTEN_FDS is not for this process: ignored", listen_pid=pid_text, pid=own_pid)
        return []
    if not count_text.strip().isdigit():
        raise ValueError(f"LISTEN_FDS must be a count of file descriptors, got {count_text!r}")
    count = int(count_text)
    names = names_text.split(":") if names_text else []
    passed: list[PassedSocket] = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise ValueError(f"LISTEN_FDS={count}, but fd {fd} is not open: {exc.strerror}") from exc
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"passed fd {fd} ({name}) is not a socket: {exc.strerror}") from exc
        passed.append(PassedSocket(sock, name))
    return passed


def rest_socket(passed: list[PassedSocket], rest: RestConfig, source: str) -> socket.socket | None:
    """The passed socket REST's TCP address serves on (None: none passed, REST binds its own).

    ConfigError, naming rest.address: a passed socket that is not a listening TCP stream socket
    on the configured address, more than one, or one passed while REST's TCP address is off."""
    if not passed:
        return None
    if not rest.enabled or rest.address is None:
        field = "rest.enabled" if not rest.enabled else "rest.address"
        raise ConfigError(
            source,
            field,
            f"systemd passed {_listing(passed)}, but REST's TCP address is off: nothing would "
            "serve it (turn rest.address on, or drop the socket unit)",
        )
    if len(passed) > 1:
        raise ConfigError(
            source,
            "rest.address",
            f"systemd passed {_listing(passed)}; only one socket can be passed, REST's TCP address "
            "(gRPC binds its own sockets)",
        )
    only = passed[0]
    reason = _mismatch(only.sock, rest.address)
    if reason is not None:
        raise ConfigError(source, "rest.address", f"systemd passed {only.describe()}: {reason}")
    only.sock.setblocking(False)
    log.info("REST adopts the socket systemd passed", socket=only.describe())
    return only.sock


def _mismatch(sock: socket.socket, address: str) -> str | None:
    """Why `sock` cannot be REST's listener on `address` (host:port), or None."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return "not a TCP socket (only REST's TCP address can be passed)"
    if sock.type != socket.SOCK_STREAM:
        return "not a stream socket (ListenStream= is the one to use)"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "not listening (Accept=no is the one to use: opmasd accepts its connections itself)"
    host, port = split_address(address)
    bound_host, bound_port = sock.getsockname()[:2]
    if port not in (0, bound_port) or not _same_host(host, bound_host):
        return f"it is not the configured {address}; make them the same"
    return None


def _same_host(configured: str, bound: str) -> bool:
    """Whether a socket bound to the IP `bound` listens where `configured` (IP or name) says."""
    try:
        return ipaddress.ip_address(configured) == ipaddress.ip_address(bound)
    except ValueError:
        pass  # a name: what it resolves to (at start, once, before the loop serves anyone)
    try:
        infos = socket.getaddrinfo(configured, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve rest.address's host", host=configured, error=str(exc))
        return False
    return any(ipaddress.ip_address(info[4][0]) == ipaddress.ip_address(bound) for info in infos)


def _where(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError as exc:
        return f"<{exc.strerror}>"
    if isinstance(name, tuple):
        host, port = name[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name) or "<unnamed>"


def _listing(passed: list[PassedSocket]) -> str:
    return ", ".join(p.describe() for p in passed)
