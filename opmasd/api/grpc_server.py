"""The gRPC server: AgentService, health checking and reflection, on a unix socket and TCP.

The unix socket's owner, group and mode are the local authorization (a unix-socket peer
carries no credentials grpc can check), so the socket is created with a restrictive umask and
then given the configured mode.

Health: the overall status ("") is SERVING from start to shutdown (the process answers);
AgentService's own status is what `set_serving` last said, which api.health keeps in step with
the daemon's readiness. Interceptors given to the constructor see every call, REST's included
(the gateway calls through a loopback channel).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opmas.v1 import agents_pb2
from opmasd.api.grpc_handlers import add_service
from opmasd.api.grpc_servicer import AgentService
from opmasd.api.local_calls import LocalChannel, LocalServer
from opmasd.manager import AgentManager

log = structlog.get_logger(__name__)

SERVICE_NAME = agents_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


class ListenError(Exception):
    """A listening address could not be bound; the message names it."""


@dataclass(frozen=True)
class GrpcListeners:
    socket_path: Path | None
    socket_mode: int = 0o660
    # host:port; port 0 picks a free port (see GrpcServer.tcp_port).
    address: str = ""


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
        servicer = AgentService(manager, self.stopping)
        service = agents_pb2.DESCRIPTOR.services_by_name["AgentService"]
        add_service(self._server, service, servicer)
        # The same servicer behind the same interceptors, for in-process callers (REST).
        self._local = LocalServer(interceptors)
        add_service(self._local, service, servicer)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
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
            os.chmod(listeners.socket_path, listeners.socket_mode)
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
