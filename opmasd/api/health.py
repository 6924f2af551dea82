"""Liveness and readiness: what `GET /healthz` and `GET /readyz` answer, and the gRPC health status.

Alive: the process answers (whoever asks is answered by its event loop). Nothing the daemon
depends on makes it "dead": a NATS or database outage is survived and retried, and a
supervisor restarting opmasd over one would only add an outage of its own.

Ready: every check passes:
- store: the write-behind's last write did not fail (writes are queued and retried while it
  does). An idle daemon writes nothing, so a store that went away since is seen at the next
  write (a heartbeat flush, a state change, the monitor's flush), not before;
- bus: connected to NATS;
- grpc: the gRPC server has started and is not stopping (the REST gateway goes through it).

The gRPC side follows: AgentService's health status is SERVING while ready, NOT_SERVING
otherwise, set by a periodic check (every `interval`, 1 s by default, and once at start) when
the answer changes. The overall status ("") stays SERVING until shutdown (grpc_server): it is
the liveness answer. Shutdown makes everything NOT_SERVING for good (enter_graceful_shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog

from opmasd.core.tasks import TaskOwner
from opmasd.manager import AgentManager

log = structlog.get_logger(__name__)

OK = "ok"


class ServingState(Protocol):
    """What readiness needs of the gRPC server (api.grpc_server.GrpcServer is one)."""

    @property
    def serving(self) -> bool: ...

    async def set_serving(self, serving: bool) -> None: ...


class DaemonHealth:
    def __init__(
        self,
        manager: AgentManager,
        bus_connected: Callable[[], bool],
        grpc: ServingState,
        interval: float = 1.0,
    ) -> None:
        self._manager = manager
        self._bus_connected = bus_connected
        self._grpc = grpc
        self._interval = interval
        self._tasks = TaskOwner("health")
        # What the gRPC health status was last set to (None: not yet set by us).
        self._published: bool | None = None

    def alive(self) -> bool:
        return True

    def ready(self) -> tuple[bool, dict[str, str]]:
        """Whether the daemon is ready, and each check's "ok" or the reason it is not."""
        stats = self._manager.stats()
        checks = {
            "store": OK
            if not stats.store_failing
            else (
                f"store writes are failing ({stats.pending_writes} rows and "
                f"{stats.pending_heartbeats} heartbeat times pending, retried at each flush)"
            ),
            "bus": OK if self._bus_connected() else "not connected to NATS",
            "grpc": OK if self._grpc.serving else "the gRPC server is not serving",
        }
        return all(value == OK for value in checks.values()), checks

    async def refresh(self) -> bool:
        """Check readiness now and set the gRPC health status if it changed; returns readiness."""
        ready, checks = self.ready()
        if ready != self._published:
            if ready:
                log.info("daemon ready")
            else:
                log.warning("daemon not ready", **{name: why for name, why in checks.items() if why != OK})
            await self._grpc.set_serving(ready)
            self._published = ready
        return ready

    async def start(self) -> None:
        """Publish readiness now, then keep it in step every interval until stop()."""
        await self.refresh()
        self._tasks.spawn(self._watch(), "readiness")

    async def stop(self) -> None:
        await self._tasks.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("readiness check failed")
