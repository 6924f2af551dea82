"""Where opmasd listens, and the gRPC channel to it."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import grpc

from opmas.local import DEFAULT_TCP_ADDRESS, default_socket_path
from opmas.v1 import agents_pb2_grpc


@dataclass(frozen=True)
class Endpoint:
    """A resolved server address: `target` is what grpc dials, `display` what error messages show."""

    target: str
    display: str
    is_unix: bool


def parse_server(server: str) -> Endpoint:
    """An explicit --server / OPMAS_SERVER value: a unix socket path or URI, or host:port."""
    value = server.strip()
    if not value:
        raise ValueError("the server address is empty")
    if value.startswith("unix://"):
        path = value[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"{server!r}: unix:// needs an absolute path (unix:///path/to/opmasd.sock)")
        return _unix(path)
    if value.startswith("unix:"):
        return _unix(os.path.abspath(value[len("unix:") :]))
    if value.startswith(("unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        # Already a grpc target URI: hand it over untouched.
        return Endpoint(target=value, display=value, is_unix=value.startswith("unix-abstract:"))
    if "/" in value or value.endswith(".sock"):
        return _unix(os.path.abspath(os.path.expanduser(value)))
    if ":" not in value:
        raise ValueError(f"{server!r} is neither a socket path nor host:port")
    return Endpoint(target=value, display=value, is_unix=False)


def resolve_endpoint(
    server: str | None,
    env: Mapping[str, str] | None = None,
    euid: int | None = None,
) -> Endpoint:
    """--server, else $OPMAS_SERVER, else the daemon's default socket if it exists, else TCP."""
    env = os.environ if env is None else env
    if server:
        return parse_server(server)
    if env.get("OPMAS_SERVER"):
        return parse_server(env["OPMAS_SERVER"])
    # Where a daemon run by this user in this environment binds (opmas.local, the daemon's rule).
    path = str(default_socket_path(env, euid))
    # os.path.exists, not Path.exists: a directory this user may not search must mean
    # "not there", not a PermissionError.
    if os.path.exists(path):
        return _unix(path)
    return Endpoint(target=DEFAULT_TCP_ADDRESS, display=DEFAULT_TCP_ADDRESS, is_unix=False)


def _unix(path: str) -> Endpoint:
    return Endpoint(target=f"unix:{path}", display=path, is_unix=True)


def probe(endpoint: Endpoint, timeout: float = 2.0) -> bool | None:
    """Whether a plain socket connect to the endpoint succeeds; None when it cannot be tried
    (a grpc target URI such as dns:///...)."""
    try:
        if endpoint.is_unix:
            name = endpoint.target.split(":", 1)[1]
            if endpoint.target.startswith("unix-abstract:"):
                name = "\0" + name
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(name)
            return True
        host, sep, port = endpoint.target.rpartition(":")
        if not sep or not port.isdigit() or "/" in host:
            return None
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class Connection:
    """A channel plus the AgentService stub."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(
            endpoint.target,
            options=[
                # A fleet-wide list can outgrow the 4 MiB default.
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self.stub = agents_pb2_grpc.AgentServiceStub(self.channel)

    def is_connect_failure(self, err: grpc.RpcError) -> bool:
        """Whether an error means the daemon could not be reached, rather than an answer from it.

        grpc gives both the same code (UNAVAILABLE) and no reliable mark of who said it; a
        server's own message may well read "failed to connect to NATS". So, on this error path
        only, try a plain connect. (Watching the channel's connectivity instead needs grpc's
        polling thread, which raises into stderr when the channel closes under it.)
        """
        if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        reachable = probe(self.endpoint)
        if reachable is None:
            # grpc core's own wording for "no connection"; only used when no probe is possible.
            details = err.details() or ""
            return details.startswith(("failed to connect to all addresses", "errors resolving", "DNS"))
        return not reachable

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
