"""The gRPC server: AgentService, TokenService, health checking and reflection, on a unix
socket and TCP.

The unix socket's owner, group and mode are the local authorization (a unix-socket peer
carries no credentials grpc can check; api.auth makes whoever connects there an admin), so the
socket is created with a restrictive umask and then given the configured group and mode. TCP
callers present API tokens (api.auth_interceptor, given as one of the interceptors).

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
from opmasd.api.token_servicer import TokenService
from opmasd.manager import AgentManager

log = structlog.get_logger(__name__)

AGENT_SERVICE = agents_pb2.DESCRIPTOR.services_by_name["AgentService"]
TOKEN_SERVICE = tokens_pb2.DESCRIPTOR.services_by_name["TokenService"]
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"]
SERVICE_NAME = AGENT_SERVICE.full_name


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


class GrpcServer:
    def __init__(
        self,
        manager: AgentManager,
        listeners: GrpcListeners,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._listeners = listeners
        self.stopping = asyncio.Event()
        self._started = False
        self._server = grpc.aio.server(
            interceptors=list(interceptors),
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        # The same servicers behind the same interceptors for in-process callers (REST).
        self._local = LocalServer(interceptors)
        for service, servicer in (
            (AGENT_SERVICE, AgentService(manager, self.stopping)),
            (TOKEN_SERVICE, TokenService(manager.tokens)),
            (AUDIT_SERVICE, AuditService(manager.audit)),
        ):
            add_service(self._server, service, servicer)
            add_service(self._local, service, servicer)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                TOKEN_SERVICE.full_name,
                AUDIT_SERVICE.full_name,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        self.tcp_port: int | None = None

    def local_channel(self) -> LocalChannel:
        """A channel to AgentService that calls it in-process (see api/local_calls.py)."""
        return self._local.channel()

    async def start(self) -> None:
        listeners = self._listeners
        if listeners.socket_path is not None:
            self._bind_unix(listeners.socket_path)
        if listeners.address:
            try:
                self.tcp_port = self._server.add_insecure_port(listeners.address)
            except RuntimeError as exc:
                raise ListenError(f"cannot listen on {listeners.address}: {exc}") from exc
            if not self.tcp_port:
                raise ListenError(f"cannot listen on {listeners.address}: address in use or invalid")
        await self._server.start()
        if listeners.socket_path is not None:
            give_socket(listeners.socket_path, listeners.socket_mode, listeners.socket_gid)
        self._started = True
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC serving",
            socket=str(listeners.socket_path) if listeners.socket_path else None,
            address=listeners.address or None,
            port=self.tcp_port,
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

    def _bind_unix(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            # A socket left by a daemon that died; a live one would still answer, so check.
            if _socket_answers(path):
                raise ListenError(f"{path} is in use by a running opmasd")
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            if not self._server.add_insecure_port(f"unix://{path}"):
                raise ListenError(f"cannot listen on unix socket {path}")
        finally:
            os.umask(old_umask)

    async def stop(self, grace: float) -> None:
        self.stopping.set()
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        path = self._listeners.socket_path
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove the gRPC socket", path=str(path), error=str(exc))


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
