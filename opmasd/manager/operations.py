"""The manager: every management operation, whichever API it arrives through.

gRPC, REST and NATS handlers call these methods and nothing else. They take and return domain
values (manager.model), raise domain errors (manager.errors), and know nothing of wire formats.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from opmasd.bus.base import AgentBus
from opmasd.core.errors import (
    AlreadyExists,
    BusTimeout,
    BusUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from opmasd.core.ids import agent_id_from_name, check_agent_id
from opmasd.core.messages import CommandReply, MetricsReport
from opmasd.core.model import (
    AgentRecord,
    AgentSource,
    AgentSpec,
    AgentState,
    DesiredState,
    ProcessUsage,
    ResourceLimits,
    RestartPolicy,
)
from opmasd.core.tasks import TaskOwner
from opmasd.manager.events import EventHub, Subscription
from opmasd.manager.health import HealthMonitor, HealthSettings
from opmasd.manager.packages import scan as package_scan
from opmasd.manager.packages.manifest import ManifestError, load_manifest
from opmasd.manager.registry import AgentRegistry
from opmasd.manager.restart import RestartSettings
from opmasd.manager.supervisor import OperationResult, Supervisor
from opmasd.manager.validation import check_spec
from opmasd.runtime.base import Runtime
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)

DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 100_000
DEFAULT_COMMAND_TIMEOUT = 5.0
MAX_COMMAND_TIMEOUT = 300.0


@dataclass(frozen=True)
class ManagerSettings:
    node: str
    agent_dirs: tuple[Path, ...] = ()
    restart: RestartSettings = RestartSettings()
    default_stop_timeout: float = 10.0
    default_restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    # Start discovered agents even when their manifest does not say autostart.
    autostart_discovered: bool = False
    monitoring_interval: float = 5.0
    discovery_interval: float = 60.0
    cleanup_interval: float = 3600.0
    transitions_kept_per_agent: int = 1000
    health: HealthSettings = HealthSettings()
    # How often batched heartbeat times are written to the store.
    heartbeat_flush_interval: float = 1.0


@dataclass(frozen=True)
class AgentFilter:
    state: AgentState | None = None
    type: str = ""
    node: str = ""


@dataclass(frozen=True)
class DiscoveredAgent:
    agent_id: str
    name: str
    manifest_path: str
    new: bool


@dataclass
class DiscoveryReport:
    agents: list[DiscoveredAgent] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)


class AgentManager:
    def __init__(
        self,
        store: AgentStore,
        runtime: Runtime,
        settings: ManagerSettings,
        agent_environment: Mapping[str, str] | None = None,
        bus: AgentBus | None = None,
    ) -> None:
        self._store = store
        self._runtime = runtime
        self._settings = settings
        self.hub = EventHub()
        self._registry = AgentRegistry(store, self.hub)
        self._tasks = TaskOwner("manager")
        # Variables every agent gets from the daemon (NATS_URL, ...).
        self.agent_environment: dict[str, str] = dict(agent_environment or {})
        self._bus = bus
        self.health = HealthMonitor(self._registry, store, settings.health)
        if bus is not None:
            bus.set_handlers(self.health.on_heartbeat, self.health.on_metrics)
            self.agent_environment.setdefault("NATS_URL", bus.agent_url)
        self._supervisor = Supervisor(
            self._registry, runtime, settings.restart, self._tasks, lambda: self.agent_environment
        )
        self._discovery_lock = asyncio.Lock()
        self.last_discovery = DiscoveryReport()

    @property
    def settings(self) -> ManagerSettings:
        return self._settings

    @settings.setter
    def settings(self, value: ManagerSettings) -> None:
        """A reload: restart policy, health and discovery settings apply from the next use; the
        intervals of the periodic loops, fixed when they started, apply at the next daemon start."""
        self._settings = value
        self._supervisor.settings = value.restart
        self.health.settings = value.health

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, discover: bool = True) -> None:
        """Load the store, re-adopt or restart agents as desired, scan for packages, start loops."""
        self._registry.load()
        for rec in list(self._registry.live()):
            if rec.node != self.settings.node:
                continue  # another host's agent, in a shared database: that host runs it
            async with self._supervisor.lock(rec.agent_id):
                await self._supervisor.recover(rec)
        if discover:
            await self.discover()
        self._tasks.spawn(self._every(self.settings.monitoring_interval, self._monitor), "monitor")
        if discover and self.settings.discovery_interval > 0:
            self._tasks.spawn(self._every(self.settings.discovery_interval, self.discover), "discovery")
        self._tasks.spawn(self._every(self.settings.cleanup_interval, self._cleanup), "cleanup")
        if self._bus is not None:
            timeout = self.settings.health.heartbeat_timeout
            check_every = min(max(timeout / 4, 0.05), self.settings.monitoring_interval)
            self._tasks.spawn(self._every(check_every, self._check_heartbeats), "heartbeat-check")
            self._tasks.spawn(
                self._every(self.settings.heartbeat_flush_interval, self._flush), "heartbeat-flush"
            )

    async def stop(self, stop_agents: bool) -> None:
        await self._supervisor.shutdown(stop_agents)
        await self._tasks.close()
        self.health.flush()
        self._registry.flush()
        self.hub.close()

    async def _every(self, interval: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                log.exception("periodic job failed", job=getattr(job, "__name__", str(job)))

    async def _monitor(self) -> None:
        self._registry.flush()
        await self._runtime.maintain()

    async def _flush(self) -> None:
        self.health.flush()

    async def _check_heartbeats(self) -> None:
        connected = self._bus.is_connected if self._bus is not None else False
        for rec in self.health.lost(bus_connected=connected):
            if rec.spec.restart_on_inactive:
                self._tasks.spawn(self._restart_inactive(rec.agent_id), f"restart-inactive:{rec.agent_id}")

    async def _restart_inactive(self, agent_id: str) -> None:
        async with self._supervisor.lock(agent_id):
            rec = self._registry.get(agent_id)
            if rec is None or rec.state is not AgentState.INACTIVE:
                return
            restarts = rec.restart_count
            try:
                await self._supervisor.restart(rec, f"{rec.state_reason}; restart_on_inactive")
                # A restart by policy, not by an operator: it counts like a crash restart.
                rec.restart_count = restarts + 1
                self._registry.save(rec)
            except FailedPrecondition as exc:
                log.warning("inactive agent could not be restarted", agent_id=agent_id, error=exc.message)

    async def _cleanup(self) -> None:
        removed = self._store.prune_transitions(self.settings.transitions_kept_per_agent)
        if removed:
            log.info("old transitions pruned", removed=removed)

    # -- queries --------------------------------------------------------------------------------

    def get_agent(self, agent_id: str) -> AgentRecord:
        check_agent_id(agent_id)
        rec = self._registry.get(agent_id)
        if rec is None:
            raise NotFound("agent", agent_id)
        return rec

    def _local_agent(self, agent_id: str) -> AgentRecord:
        """The agent, when this node runs it: only its own node can start or stop it."""
        rec = self.get_agent(agent_id)
        if rec.node != self.settings.node:
            raise FailedPrecondition(
                f"agent {agent_id} runs on node {rec.node!r}, not on {self.settings.node!r}"
            )
        return rec

    def list_agents(self, filt: AgentFilter = AgentFilter()) -> list[AgentRecord]:
        return sorted(
            (
                rec
                for rec in self._registry.live()
                if (filt.state is None or rec.state is filt.state)
                and (not filt.type or rec.spec.type == filt.type)
                and (not filt.node or rec.node == filt.node)
            ),
            key=lambda rec: rec.agent_id,
        )

    def counts(self) -> tuple[int, int]:
        """(agents, of which running), for sd_notify STATUS."""
        agents = list(self._registry.live())
        return len(agents), sum(1 for rec in agents if rec.state is AgentState.RUNNING)

    def usage(self, agent_id: str) -> ProcessUsage | None:
        self.get_agent(agent_id)
        return self._runtime.usage(agent_id)

    def reported_metrics(self, agent_id: str) -> MetricsReport | None:
        """What the agent last published on agent.metrics (since this daemon started)."""
        self.get_agent(agent_id)
        return self.health.reported_metrics(agent_id)

    async def tail_logs(self, agent_id: str, lines: int) -> list[str]:
        self.get_agent(agent_id)
        if lines < 0:
            raise InvalidArgument.single("tail_lines", f"must not be negative, got {lines}")
        return await self._runtime.tail_logs(agent_id, min(lines or DEFAULT_TAIL_LINES, MAX_TAIL_LINES))

    def follow_logs(self, agent_id: str) -> AsyncIterator[str]:
        self.get_agent(agent_id)
        return self._runtime.follow_logs(agent_id)

    def watch(self, agent_ids: Sequence[str] = ()) -> Subscription:
        for agent_id in agent_ids:
            check_agent_id(agent_id, "agent_ids")
        return self.hub.subscribe(frozenset(agent_ids))

    # -- operations -----------------------------------------------------------------------------

    async def start_agent(self, agent_id: str) -> OperationResult:
        async with self._supervisor.lock(agent_id):
            rec = self._local_agent(agent_id)
            result = await self._supervisor.start(rec, "started by operator")
        await self._registry.durable()
        return result

    async def stop_agent(self, agent_id: str, timeout: float | None = None) -> OperationResult:
        if timeout is not None and timeout < 0:
            raise InvalidArgument.single("timeout", f"must not be negative, got {timeout:g}s")
        async with self._supervisor.lock(agent_id):
            rec = self._local_agent(agent_id)
            result = await self._supervisor.stop(rec, "stopped by operator", timeout)
        await self._registry.durable()
        return result

    async def restart_agent(self, agent_id: str) -> OperationResult:
        async with self._supervisor.lock(agent_id):
            rec = self._local_agent(agent_id)
            result = await self._supervisor.restart(rec, "restarted by operator")
        await self._registry.durable()
        return result

    async def send_command(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float | None = None
    ) -> CommandReply:
        """Deliver a custom command to the agent over NATS and return its reply."""
        if not command.strip():
            raise InvalidArgument.single("command", "must not be empty")
        if timeout is not None and not 0 < timeout <= MAX_COMMAND_TIMEOUT:
            raise InvalidArgument.single(
                "timeout", f"must be in (0, {MAX_COMMAND_TIMEOUT:g}] seconds, got {timeout:g}"
            )
        timeout = timeout or DEFAULT_COMMAND_TIMEOUT
        rec = self.get_agent(agent_id)
        if self._bus is None:
            raise Unavailable("commands need NATS, and this opmasd runs without it")
        if rec.pid is None:
            raise FailedPrecondition(f"agent {agent_id} is not running (state {rec.state.value})")
        try:
            return await self._bus.command_agent(agent_id, command, params, timeout)
        except BusTimeout:
            raise DeadlineExceeded(
                f"agent {agent_id} did not answer {command!r} within {timeout:g}s"
            ) from None
        except BusUnavailable as exc:
            raise Unavailable(f"cannot reach agent {agent_id}: NATS is unavailable ({exc})") from None

    def spec_defaults(self, name: str = "") -> AgentSpec:
        return AgentSpec(
            name=name,
            command=(),
            restart_policy=self.settings.default_restart_policy,
            stop_timeout=self.settings.default_stop_timeout,
        )

    async def create_agent(
        self, fields: Mapping[str, Any], agent_id: str = "", start: bool = False
    ) -> AgentRecord:
        """Register an agent from spec fields (AgentSpec field names; unset ones default)."""
        spec = apply_fields(self.spec_defaults(), fields)
        check_spec(spec)
        agent_id = agent_id or agent_id_from_name(spec.name)
        check_agent_id(agent_id)
        return await self._register(agent_id, spec, AgentSource.REGISTERED, "", start or spec.autostart)

    async def create_agent_from_manifest(
        self, path: str, agent_id: str = "", start: bool = False
    ) -> AgentRecord:
        if not Path(path).is_absolute():
            raise InvalidArgument.single("manifest_path", f"{path!r} must be an absolute path")
        try:
            manifest = load_manifest(Path(path), self.spec_defaults())
        except ManifestError as exc:
            raise InvalidArgument.single("manifest_path", str(exc)) from exc
        agent_id = agent_id or manifest.agent_id
        check_agent_id(agent_id)
        return await self._register(
            agent_id,
            manifest.spec,
            AgentSource.REGISTERED,
            str(manifest.path),
            start or manifest.spec.autostart,
        )

    async def _register(
        self, agent_id: str, spec: AgentSpec, source: AgentSource, manifest_path: str, start: bool
    ) -> AgentRecord:
        async with self._supervisor.lock(agent_id):
            existing = self._registry.get_any(agent_id)
            if existing is not None and not existing.deleted:
                raise AlreadyExists("agent", agent_id)
            rec = AgentRecord(
                agent_id=agent_id,
                spec=spec,
                source=source,
                manifest_path=manifest_path,
                node=self.settings.node,
                state_reason="registered" if source is AgentSource.REGISTERED else "discovered",
            )
            self._registry.save(rec)
            log.info("agent registered", agent_id=agent_id, source=source.value)
            if start:
                await self._supervisor.start(rec, "started at registration")
        await self._registry.durable()
        return rec

    async def update_agent(self, agent_id: str, fields: Mapping[str, Any]) -> AgentRecord:
        if not fields:
            raise InvalidArgument.single("update_mask", "names no field to change")
        async with self._supervisor.lock(agent_id):
            rec = self.get_agent(agent_id)
            spec = apply_fields(rec.spec, fields)
            check_spec(spec)
            rec.spec = spec
            self._registry.save(rec)
            log.info("agent updated", agent_id=agent_id, fields=sorted(fields))
        await self._registry.durable()
        return rec

    async def delete_agent(self, agent_id: str) -> tuple[AgentRecord, bool]:
        """Stop and remove the agent; (record, False) when it was already deleted."""
        check_agent_id(agent_id)
        async with self._supervisor.lock(agent_id):
            rec = self._registry.get_any(agent_id)
            if rec is None:
                raise NotFound("agent", agent_id)
            if rec.deleted:
                return rec, False
            self._local_agent(agent_id)
            await self._supervisor.stop(rec, "deleted by operator")
            # The row stays as a tombstone, so discovery does not bring a deleted agent back.
            rec.deleted = True
            self._registry.save(rec)
            self.health.forget(agent_id)
            log.info("agent deleted", agent_id=agent_id)
        await self._registry.durable()
        return rec, True

    async def discover(self) -> DiscoveryReport:
        """Scan the agents directories; register new packages, refresh changed manifests."""
        async with self._discovery_lock:
            scan = package_scan.scan(self.settings.agent_dirs, self.spec_defaults())
            report = DiscoveryReport(errors=list(scan.errors))
            for manifest in scan.manifests:
                agent_id = manifest.agent_id
                path = str(manifest.path)
                async with self._supervisor.lock(agent_id):
                    rec = self._registry.get_any(agent_id)
                    if rec is None:
                        rec = AgentRecord(
                            agent_id=agent_id,
                            spec=manifest.spec,
                            source=AgentSource.DISCOVERED,
                            manifest_path=path,
                            node=self.settings.node,
                            state_reason="discovered",
                        )
                        self._registry.save(rec)
                        log.info("agent discovered", agent_id=agent_id, manifest=path)
                        report.agents.append(DiscoveredAgent(agent_id, manifest.spec.name, path, True))
                        if manifest.spec.autostart or self.settings.autostart_discovered:
                            await self._start_quietly(rec, "started at discovery (autostart)")
                        continue
                    if rec.deleted:
                        continue
                    if rec.manifest_path != path:
                        report.errors.append(
                            ManifestError(
                                manifest.path, f"agent id {agent_id!r} is already used by another agent"
                            )
                        )
                        continue
                    if rec.spec != manifest.spec:
                        rec.spec = manifest.spec
                        self._registry.save(rec)
                        log.info("agent manifest changed; applies at next start", agent_id=agent_id)
                    report.agents.append(DiscoveredAgent(agent_id, manifest.spec.name, path, False))
            self.last_discovery = report
        await self._registry.durable()
        return report

    async def _start_quietly(self, rec: AgentRecord, reason: str) -> None:
        try:
            await self._supervisor.start(rec, reason)
        except FailedPrecondition as exc:
            log.warning("agent did not start", agent_id=rec.agent_id, error=exc.message)


def apply_fields(base: AgentSpec, fields: Mapping[str, Any]) -> AgentSpec:
    """base with the given fields replaced. `resources` is itself a mapping of its fields."""
    known = {f.name for f in dataclasses.fields(AgentSpec)}
    changes: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in known:
            raise InvalidArgument.single(f"update_mask.{key}", "is not a field of the agent spec")
        if key == "resources":
            changes[key] = dataclasses.replace(base.resources, **dict(value))
        elif key == "environment":
            changes[key] = tuple(sorted(dict(value).items()))
        elif key == "command":
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


# The API edge takes these from here, not from the layers below the manager.
__all__ = [
    "AgentFilter",
    "AgentManager",
    "DesiredState",
    "DiscoveredAgent",
    "DiscoveryReport",
    "ManagerSettings",
    "MetricsReport",
    "OperationResult",
    "ProcessUsage",
    "ResourceLimits",
]
