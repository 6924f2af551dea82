"""Server addresses as opmasctl takes them (--server, $OPMAS_SERVER), and a plain connect to one.

Accepted: a socket path (`/run/opmas/opmasd.sock`, `./d.sock`), `unix:///abs/path`, `unix:path`,
`host:port`, `[::1]:port`, gRPC's own target URIs (`dns:///host:port`, `ipv4:`, `ipv6:`,
`unix-abstract:`), and `http://host:port` / `https://host:port`, which name the same host:port
over plaintext or TLS. Any other `scheme://` is refused with what is accepted.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

# grpc target URIs handed over untouched (https://github.com/grpc/grpc/blob/master/doc/naming.md).
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix-abstract:")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
_HTTP_PORTS = {"http": 80, "https": 443}
ACCEPTED = "a socket path, unix:///path, host:port, dns:///host:port, http://host:port or https://host:port"


@dataclass(frozen=True)
class Endpoint:
    """A resolved server address: `target` is what grpc dials, `display` what messages show;
    `secure` means TLS (https://, or a daemon's TCP address its configuration gives TLS),
    `plain` plaintext whatever TLS settings are given (http://)."""

    target: str
    display: str
    is_unix: bool
    secure: bool = False
    plain: bool = False


def unix_endpoint(path: str) -> Endpoint:
    return Endpoint(target=f"unix:{path}", display=path, is_unix=True)


def tcp_endpoint(address: str) -> Endpoint:
    return Endpoint(target=address, display=address, is_unix=False)


def parse_server(server: str) -> Endpoint:
    """An explicit --server / OPMAS_SERVER value; ValueError says what is wrong with it."""
    value = server.strip()
    if not value:
        raise ValueError("the server address is empty")
    url = _URL.match(value)
    if url:
        scheme = url["scheme"].lower()
        if scheme == "unix":
            path = url["rest"]
            if not path.startswith("/"):
                raise ValueError(f"{server!r}: unix:// needs an absolute path (unix:///path/to/opmasd.sock)")
            return _socket(path)
        if scheme in _HTTP_PORTS:
            return _http(server, scheme, url["rest"])
        if scheme != "dns":
            raise ValueError(f"{server!r}: unsupported scheme {scheme}://; give {ACCEPTED}")
    if value.startswith("unix:"):
        return _socket(os.path.abspath(os.path.expanduser(value[len("unix:") :])))
    if value.startswith(_GRPC_SCHEMES):
        return Endpoint(target=value, display=value, is_unix=value.startswith("unix-abstract:"))
    if "/" in value or value.endswith(".sock"):
        return _socket(os.path.abspath(os.path.expanduser(value)))
    return tcp_endpoint(check_host_port(value, server))


# sun_path holds 108 bytes with its terminating NUL: a longer path names no socket at all.
MAX_SOCKET_PATH_BYTES = 107


def _socket(path: str) -> Endpoint:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"the socket path is {len(os.fsencode(path))} bytes long; a unix socket path has at most "
            f"{MAX_SOCKET_PATH_BYTES} (use a shorter path or a symlink to its folder)"
        )
    return unix_endpoint(path)


def _http(server: str, scheme: str, rest: str) -> Endpoint:
    """http://host[:port][/] → host:port in plaintext, https:// → the same over TLS."""
    authority, _, path = rest.partition("/")
    if path or "?" in authority or "#" in authority:
        raise ValueError(f"{server!r}: only {scheme}://host:port, without a path (gRPC has its own)")
    if "@" in authority:
        raise ValueError(f"{server!r}: credentials in the address are not supported")
    if not authority:
        raise ValueError(f"{server!r}: no host")
    if not re.search(r":\d+$", authority):
        authority = f"{authority}:{_HTTP_PORTS[scheme]}"
    address = check_host_port(authority, server)
    return Endpoint(
        target=address,
        display=f"{scheme}://{address}",
        is_unix=False,
        secure=scheme == "https",
        plain=scheme == "http",
    )


def check_host_port(value: str, server: str | None = None) -> str:
    """host:port, checked; ValueError names `server` (the text as given) when it is not."""
    server = value if server is None else server
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{server!r} is neither a socket path nor host:port; give {ACCEPTED}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{server!r}: the port must be a number from 1 to 65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{server!r}: put an IPv6 address in brackets, e.g. [::1]:50051")
    return value


def can_probe(endpoint: Endpoint) -> bool:
    """Whether probe() can judge this endpoint: not a grpc target URI such as dns:///host."""
    if endpoint.is_unix:
        return True
    host, sep, port = endpoint.target.rpartition(":")
    return bool(sep) and port.isdigit() and "/" not in host and not host.startswith(_GRPC_SCHEMES)


def probe(endpoint: Endpoint, timeout: float = 2.0) -> str | None:
    """None when a plain socket connect to the endpoint succeeds (or cannot be tried: see
    can_probe), else why not: "connection refused", "no such socket", ..."""
    if not can_probe(endpoint):
        return None
    try:
        if endpoint.is_unix:
            name = endpoint.target.split(":", 1)[1]
            if endpoint.target.startswith("unix-abstract:"):
                name = "\0" + name
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(name)
        else:
            host, _, port = endpoint.target.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
    except FileNotFoundError:
        return "no such socket"
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except socket.gaierror as err:
        return f"cannot resolve the host: {err.strerror or err}"
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        if isinstance(err, PermissionError) and endpoint.is_unix:
            reason += " (the socket's group may use it: are you in it?)"
        return reason
    return None
