"""The gRPC server: AgentService, TokenService, health checking and reflection, on a unix
socket, TCP, and optionally a second unix socket for viewers (whoever may connect reads only).

The unix socket's owner, group and mode are the local authorization (a unix-socket peer
carries no credentials grpc can check; api.auth makes whoever connects there an admin), so the
socket is created with a restrictive umask and then given the configured group and mode. TCP
callers present API tokens (api.auth_interceptor, given as one of the interceptors), over TLS
when it is configured (api.tls: a reload replaces its files; mTLS checks a client certificate
at the transport, while the token still decides the role).

Health: the overall status ("") is SERVING from start to shutdown (the process answers);
AgentService's own status is what `set_serving` last said, which api.health keeps in step with
the daemon's readiness. Interceptors given to the constructor see every call, REST's included
(the gateway calls through a loopback channel).
"""

from __future__ import annotations

import asyncio
import grp
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opmas.v1 import agents_pb2, audit_pb2, tokens_pb2
from opmasd.api.audit_servicer import AuditService
from opmasd.api.grpc_handlers import add_service
from opmasd.api.grpc_servicer import AgentService
from opmasd.api.local_calls import LocalChannel, LocalServer
from opmasd.api.tcp_front import TcpFront
from opmasd.api.tls import ServerTls
from opmasd.api.token_servicer import TokenService
from opmasd.manager import AgentManager

log = structlog.get_logger(__name__)

AGENT_SERVICE = agents_pb2.DESCRIPTOR.services_by_name["AgentService"]
TOKEN_SERVICE = tokens_pb2.DESCRIPTOR.services_by_name["TokenService"]
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"]
SERVICE_NAME = AGENT_SERVICE.full_name


_COMMON_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)]
# Calls in flight on one TCP connection (more wait in the client): with the connection cap,
# what bounds the calls a flood can hold open while their refusals are paced (api.refusal_pacing).
MAX_STREAMS_PER_CONNECTION = 32
HANDSHAKE_TIMEOUT_MS = 15_000
IDLE_CONNECTION_MS = 300_000


class ListenError(Exception):
    """A listening address could not be bound; the message names it."""


@dataclass(frozen=True)
class GrpcListeners:
    socket_path: Path | None
    socket_mode: int = 0o660
    # host:port; port 0 picks a free port (see GrpcServer.tcp_port).
    address: str = ""
    # The socket's group (its members are the local admins); None: the daemon's own.
    socket_gid: int | None = None
    # TLS on the TCP address (the unix socket stays plain); None: plaintext.
    tls: ServerTls | None = None
    # Connections the TCP address takes at once (past them, a new one is closed at once).
    max_connections: int = 512
    # Where the grpc server behind the TCP address listens (api.tcp_front relays to it):
    # a private unix socket; needed with an address.
    relay_socket_path: Path | None = None
    # The viewers' socket: whoever may connect is a viewer (reads only); None: none.
    viewer_socket_path: Path | None = None
    viewer_socket_mode: int = 0o666


class GrpcServer:
    def __init__(
        self,
        manager: AgentManager,
        listeners: GrpcListeners,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        viewer_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tcp_interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    ) -> None:
        """viewer_interceptors: those of the viewers' socket (its gate makes callers viewers);
        tcp_interceptors: those of the TCP address (whose calls come relayed by the front:
        their peer is api.tcp_front.network_peer's), `interceptors` when None."""
        self._listeners = listeners
        self.stopping = asyncio.Event()
        self._started = False
        # One grpc server per listener, so that what caps the network's connections and streams
        # never locks out the local socket (grpc counts connections per server).
        self._unix = grpc.aio.server(interceptors=list(interceptors), options=_COMMON_OPTIONS)
        self._viewer = grpc.aio.server(interceptors=list(viewer_interceptors), options=_COMMON_OPTIONS)
        self._tcp = grpc.aio.server(
            interceptors=list(interceptors if tcp_interceptors is None else tcp_interceptors),
            options=[
                *_COMMON_OPTIONS,
                ("grpc.max_allowed_incoming_connections", listeners.max_connections),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                # A connection with no call for this long is closed (clients reconnect at will).
                ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            ],
        )
        # The same servicers behind the same interceptors for in-process callers (REST).
        self._local = LocalServer(interceptors)
        self.health = health.aio.HealthServicer()
        servicers = (
            (AGENT_SERVICE, AgentService(manager, self.stopping)),
            (TOKEN_SERVICE, TokenService(manager.tokens)),
            (AUDIT_SERVICE, AuditService(manager.audit)),
        )
        for service, servicer in servicers:
            add_service(self._local, service, servicer)
        for server in (self._unix, self._tcp, self._viewer):
            for service, servicer in servicers:
                add_service(server, service, servicer)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    TOKEN_SERVICE.full_name,
                    AUDIT_SERVICE.full_name,
                    health.SERVICE_NAME,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        self.tcp_port: int | None = None
        self._front: TcpFront | None = None
        self._running: list[grpc.aio.Server] = []

    def local_channel(self) -> LocalChannel:
        """A channel to AgentService that calls it in-process (see api/local_calls.py)."""
        return self._local.channel()

    async def start(self) -> None:
        listeners = self._listeners
        if listeners.socket_path is not None:
            self._bind_unix(self._unix, listeners.socket_path)
            self._running.append(self._unix)
        if listeners.viewer_socket_path is not None:
            self._bind_unix(self._viewer, listeners.viewer_socket_path)
            self._running.append(self._viewer)
        if listeners.address:
            relay = listeners.relay_socket_path
            if relay is None:
                raise ListenError(f"cannot listen on {listeners.address}: no socket to relay it to")
            credentials = listeners.tls.grpc_credentials() if listeners.tls is not None else None
            self._bind_unix(self._tcp, relay, credentials)
            self._running.append(self._tcp)
            self._front = TcpFront(listeners.address, relay, listeners.max_connections)
        for server in self._running:
            await server.start()
        if self._front is not None:
            try:
                await self._front.start()
            except (OSError, ValueError) as exc:
                raise ListenError(f"cannot listen on {listeners.address}: {exc}") from exc
            self.tcp_port = self._front.port
        if listeners.socket_path is not None:
            give_socket(listeners.socket_path, listeners.socket_mode, listeners.socket_gid)
        if listeners.viewer_socket_path is not None:
            give_socket(listeners.viewer_socket_path, listeners.viewer_socket_mode, listeners.socket_gid)
        self._started = True
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC serving",
            socket=str(listeners.socket_path) if listeners.socket_path else None,
            viewer_socket=str(listeners.viewer_socket_path) if listeners.viewer_socket_path else None,
            address=listeners.address or None,
            port=self.tcp_port,
            tls=_tls_mode(listeners.tls) if listeners.address else None,
        )

    @property
    def serving(self) -> bool:
        """Started and not yet stopping: the server takes calls."""
        return self._started and not self.stopping.is_set()

    async def set_serving(self, serving: bool) -> None:
        """AgentService's health status (a no-op once shutdown has begun: it stays NOT_SERVING)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(SERVICE_NAME, status)

    def _bind_unix(
        self, server: grpc.aio.Server, path: Path, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            # A socket left by a daemon that died; a live one would still answer, so check.
            if _socket_answers(path):
                raise ListenError(f"{path} is in use by a running opmasd")
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            if credentials is not None:
                bound = server.add_secure_port(f"unix://{path}", credentials)
            else:
                bound = server.add_insecure_port(f"unix://{path}")
            if not bound:
                raise ListenError(f"cannot listen on unix socket {path}")
        finally:
            os.umask(old_umask)

    async def stop(self, grace: float) -> None:
        self.stopping.set()
        await self.health.enter_graceful_shutdown()
        front = self._front
        if front is not None:
            await front.stop_accepting()
        # Once the grace is over, the relayed connections are cut: grpc may be writing to a
        # client that reads nothing, through a relay only this loop drains, and its stop (and
        # the process's exit) would wait on that write for ever.
        cut = None if front is None else asyncio.get_running_loop().call_later(grace, front.close)
        try:
            await asyncio.gather(*(server.stop(grace) for server in self._running))
        finally:
            if cut is not None:
                cut.cancel()
            if front is not None:
                front.close()
        listeners = self._listeners
        for path in (listeners.socket_path, listeners.viewer_socket_path, listeners.relay_socket_path):
            if path is not None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove the gRPC socket", path=str(path), error=str(exc))


def _tls_mode(tls: ServerTls | None) -> str:
    """How the TCP listener speaks, for the log: plaintext, TLS, or TLS with client certificates."""
    if tls is None:
        return "off"
    return "mTLS" if tls.client_auth else "on"


def _socket_answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def give_socket(path: Path, mode: int, gid: int | None) -> None:
    """Set a listening socket's mode and group: who may connect is who may administer."""
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            raise ListenError(f"cannot give {path} to group id {gid}: {exc.strerror or exc}") from exc
    os.chmod(path, mode)


DEFAULT_SOCKET_GROUP = "opmas"


def socket_gid(configured: str | None) -> int | None:
    """The id of the sockets' group; None for the daemon's own. A configured group is taken as
    it is (giving the socket to it fails at start if the daemon may not); the default "opmas"
    only where it exists and the daemon may give it its sockets (root, or one of its members)."""
    if configured == "":
        return None
    name = configured or DEFAULT_SOCKET_GROUP
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        if configured:
            raise ListenError(f"there is no group {name!r} on this host (auth.socket_group)") from None
        return None
    if configured or os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return gid
    log.info("the sockets keep the daemon's own group: it is not in the group", group=name)
    return None
