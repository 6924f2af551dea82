"""The manager's façade: every management operation, whichever API it arrives through.

gRPC, REST and NATS handlers call these methods and nothing else. They take and return domain
values (core.model, manager.values), raise domain errors (core.errors), and know nothing of
wire formats. The work itself is done by the parts this wires together: the registry and its
write-behind persistence, the supervisor (state machine and restarts), discovery, heartbeat
judging and the metrics cache, and the periodic jobs that drive them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from opmasd.bus.base import AgentBus
from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
    StoreRejected,
    Unavailable,
)
from opmasd.core.ids import agent_id_from_name, check_agent_id
from opmasd.core.messages import CommandReply, MetricsReport
from opmasd.core.model import AgentRecord, AgentSource, AgentSpec, AgentState, DesiredState, ProcessUsage
from opmasd.core.tasks import TaskOwner
from opmasd.manager.agent_commands import deliver_command
from opmasd.manager.audit import FLUSH_INTERVAL, AuditTrail
from opmasd.manager.bulk import BulkOutcome, BulkRunner, Selection
from opmasd.manager.commits import Commits
from opmasd.manager.discovery import PackageDiscovery
from opmasd.manager.events import EventHub, Subscription
from opmasd.manager.heartbeats import HeartbeatJudge
from opmasd.manager.jobs import PeriodicJobs
from opmasd.manager.launch import AgentLogins, NoAgentLogins
from opmasd.manager.log_tail import read_tail
from opmasd.manager.metrics_cache import MetricsCache
from opmasd.manager.owned import finishes
from opmasd.manager.packages.manifest import ManifestError, load_manifest
from opmasd.manager.persistence import WriteBehind
from opmasd.manager.registry import AgentRegistry
from opmasd.manager.runtimes import Backends, RuntimeRouter, UnavailableKinds
from opmasd.manager.settings import ManagerSettings
from opmasd.manager.spec_update import apply_fields
from opmasd.manager.stats import ManagerStats, collect_stats, count_by_state
from opmasd.manager.supervisor import Supervisor
from opmasd.manager.tokens import TokenKeeper
from opmasd.manager.validation import check_grace, check_spec
from opmasd.manager.values import ALL_AGENTS, AgentFilter, DiscoveryReport, OperationResult
from opmasd.runtime.base import LogEntry
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)


class AgentManager:
    def __init__(
        self,
        store: AgentStore,
        runtime: Backends,
        settings: ManagerSettings,
        agent_environment: Mapping[str, str] | None = None,
        bus: AgentBus | None = None,
        clock: Clock = SYSTEM_CLOCK,
        logins: AgentLogins | None = None,
        unavailable_runtimes: UnavailableKinds | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._bus = bus
        self._hub = EventHub()
        self._writes = WriteBehind(store, clock, settings.commit_timeout)
        self._registry = AgentRegistry(self._writes, self._hub, clock)
        # One Runtime in front of the backends (manager.runtimes); a kind without one is refused.
        self._runtime = RuntimeRouter.of(runtime, self._registry.spec_of, unavailable_runtimes)
        self.tokens = TokenKeeper(store, self._writes, clock)
        self.audit = AuditTrail(store, self._writes, settings.node, clock)
        self._tasks = TaskOwner("manager")
        self._jobs = PeriodicJobs(self._tasks)
        # Variables every agent gets from the daemon (NATS_URL, ...).
        self._agent_environment: dict[str, str] = dict(agent_environment or {})
        self._heartbeats = HeartbeatJudge(self._registry, self._writes, settings.health, clock)
        self._metrics = MetricsCache(self._registry)
        if bus is not None:
            bus.set_handlers(self._heartbeats.on_heartbeat, self._metrics.on_metrics)
            self._agent_environment.setdefault("NATS_URL", bus.agent_url)
        env, restart = self._agent_environment, settings.restart
        self._supervisor = Supervisor(self._registry, self._runtime, restart, self._tasks, lambda: env, clock)
        self._supervisor.logins = logins or NoAgentLogins()  # each agent's own login to the bus
        self._heartbeats.on_starting_heartbeat = self._supervisor.started_by_heartbeat
        self._commits = Commits(self._registry, self._writes, self._supervisor)
        self._bulk = BulkRunner(self._supervisor, self._commits, self._local_agent, self._local_agents)
        now, refuse = (lambda: self._settings), self._runtime.spec_refusals
        self._discovery = PackageDiscovery(self._registry, self._supervisor, now, self.spec_defaults, refuse)

    @property
    def settings(self) -> ManagerSettings:
        return self._settings

    @settings.setter
    def settings(self, value: ManagerSettings) -> None:
        """A reload: restart policy, health and discovery settings apply from the next use; the
        intervals of the periodic jobs, fixed when they started, apply at the next daemon start."""
        self._settings = value
        self._supervisor.settings = value.restart
        self._heartbeats.settings = value.health

    @property
    def last_discovery(self) -> DiscoveryReport:
        return self._discovery.last_report

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, discover: bool = True) -> None:
        """Load the store, re-adopt or restart agents as desired, scan for packages, start jobs."""
        self._writes.start()
        self._registry.load(await self._writes.call(self._store.load_agents, "load agents"))
        await self.tokens.refresh()  # not load(): a node whose shared database is away starts too
        to_stop = []
        for rec in list(self._registry.live()):
            if rec.node != self.settings.node:
                continue  # another host's agent, in a shared database: that host runs it
            async with self._supervisor.lock(rec.agent_id):
                if await self._supervisor.recover(rec):
                    to_stop.append(rec.agent_id)
        if to_stop:
            self._tasks.spawn(self._supervisor.stop_adopted(to_stop), "recovery-stops")
        # Whatever an earlier daemon launched that no agent claimed now (deleted while it was
        # down, or never recorded) must not run unmanaged.
        for report in await self._runtime.reap_unmanaged():
            log.warning("stopped an unmanaged process left by an earlier opmasd", detail=report)
        if discover:
            await self._discover_in_background()
        settings = self.settings
        self._jobs.every(settings.monitoring_interval, self._runtime.rotate_logs, "monitor")
        if discover and settings.discovery_interval > 0:
            self._jobs.every(settings.discovery_interval, self._discover_in_background, "discovery")
        self._jobs.every(settings.cleanup_interval, self._cleanup, "cleanup")
        self._jobs.every(settings.monitoring_interval, self.tokens.refresh, "token-refresh")
        self._jobs.every(FLUSH_INTERVAL, self.audit.flush, "audit-flush")
        if self._bus is not None:
            timeout = settings.health.heartbeat_timeout
            # Agents' own deadlines may be short (three times a 1 s interval): look at least every second.
            check_every = min(max(timeout / 4, 0.05), settings.monitoring_interval, 1.0)
            self._jobs.every(check_every, self._check_heartbeats, "heartbeat-check")
            self._jobs.every(
                settings.heartbeat_flush_interval, self._writes.flush_heartbeats, "heartbeat-flush"
            )

    async def stop(self, stop_agents: bool) -> None:
        await self._supervisor.shutdown(stop_agents)
        await self._tasks.close()
        await self.audit.close(self.settings.commit_timeout)  # before the store's thread closes
        await self._writes.close(self.settings.commit_timeout)
        self._hub.close()

    # -- periodic jobs --------------------------------------------------------------------------

    async def _discover_in_background(self) -> None:
        """Discovery nobody asked for (start-up, the interval): a store outage is a warning."""
        try:
            await self.discover()
        except Unavailable as exc:
            log.warning("discovery ran; its changes wait for the store", error=exc.message)

    async def _check_heartbeats(self) -> None:
        connected = self._bus.is_connected if self._bus is not None else False
        for rec in self._heartbeats.mark_silent_inactive(bus_connected=connected):
            if rec.spec.restart_on_inactive:
                self._tasks.spawn(
                    self._supervisor.restart_inactive(rec.agent_id), f"restart-inactive:{rec.agent_id}"
                )

    async def _cleanup(self) -> None:
        await self.audit.prune()  # never raises: a store failure is a warning
        keep = self.settings.transitions_kept_per_agent
        removed = await self._writes.call(lambda: self._store.prune_transitions(keep), "prune transitions")
        if removed:
            log.info("old transitions pruned", removed=removed)

    # -- queries --------------------------------------------------------------------------------

    def get_agent(self, agent_id: str) -> AgentRecord:
        check_agent_id(agent_id)
        rec = self._registry.get(agent_id)
        if rec is None:
            raise NotFound("agent", agent_id)
        return rec

    def find_agent(self, agent_id: str) -> AgentRecord | None:
        """The live agent of that id, or None (a deleted one is None too)."""
        return self._registry.get(agent_id)

    def _local_agents(self) -> list[AgentRecord]:
        return [rec for rec in self._registry.live() if rec.node == self.settings.node]

    def _local_agent(self, agent_id: str) -> AgentRecord:
        """The agent, when this node runs it: only its own node can start or stop it."""
        rec = self.get_agent(agent_id)
        if rec.node != self.settings.node:
            raise FailedPrecondition(
                f"agent {agent_id} runs on node {rec.node!r}, not on {self.settings.node!r}"
            )
        return rec

    def list_agents(self, filt: AgentFilter = ALL_AGENTS) -> list[AgentRecord]:
        return sorted((rec for rec in self._registry.live() if filt.matches(rec)), key=lambda r: r.agent_id)

    def counts(self) -> tuple[int, int]:
        """(agents, of which running), for sd_notify STATUS."""
        by_state, _ = count_by_state(self._registry.live())
        return sum(by_state.values()), by_state[AgentState.RUNNING]

    def stats(self) -> ManagerStats:
        """The manager's numbers now (one pass over the agents), for metrics and readiness."""
        return collect_stats(self._registry.live(), self._supervisor, self._writes, self._heartbeats)

    def usage(self, agent_id: str) -> ProcessUsage | None:
        self.get_agent(agent_id)
        return self._runtime.usage(agent_id)

    def reported_metrics(self, agent_id: str) -> MetricsReport | None:
        """What the agent last published on agent.metrics (since this daemon started)."""
        self.get_agent(agent_id)
        return self._metrics.last(agent_id)

    async def tail_logs(
        self, agent_id: str, lines: int | None = None, since: datetime | None = None
    ) -> list[LogEntry]:
        self.get_agent(agent_id)
        return await read_tail(self._runtime, agent_id, lines, since)

    def follow_logs(self, agent_id: str) -> AsyncIterator[LogEntry]:
        self.get_agent(agent_id)
        return self._runtime.follow_logs(agent_id)

    def watch(self, agent_ids: Sequence[str] = ()) -> Subscription:
        for agent_id in agent_ids:
            check_agent_id(agent_id, "agent_ids")
        return self._hub.subscribe(frozenset(agent_ids))

    # -- operations -----------------------------------------------------------------------------

    @finishes
    async def start_agent(self, agent_id: str) -> OperationResult:
        async with self._supervisor.lock(agent_id):
            rec = self._local_agent(agent_id)
            await self._commits.desired(rec, DesiredState.RUNNING)
            result = await self._supervisor.start(rec, "started by operator")
        await self._commits.observed(agent_id)
        return await self._commits.observed_after(agent_id, self._supervisor.settled(result))

    @finishes
    async def stop_agent(self, agent_id: str, timeout: float | None = None) -> OperationResult:
        check_grace(timeout)
        async with self._supervisor.lock(agent_id):
            rec = self._local_agent(agent_id)
            await self._commits.desired(rec, DesiredState.STOPPED)
            result = await self._supervisor.stop(rec, "stopped by operator", timeout)
        await self._commits.observed(agent_id)
        return result

    @finishes
    async def restart_agent(self, agent_id: str) -> OperationResult:
        async with self._supervisor.lock(agent_id):
            rec = self._local_agent(agent_id)
            await self._commits.desired(rec, DesiredState.RUNNING)
            result = await self._supervisor.restart(rec, "restarted by operator")
        await self._commits.observed(agent_id)
        return await self._commits.observed_after(agent_id, self._supervisor.settled(result))

    async def send_command(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float | None = None
    ) -> CommandReply:
        """Deliver a custom command to the agent over NATS and return its reply."""
        return await deliver_command(self._bus, self.get_agent, agent_id, command, params, timeout)

    @finishes
    async def start_agents(self, selection: Selection) -> list[BulkOutcome]:
        start = self._supervisor.start
        return await self._bulk.run(
            selection, DesiredState.RUNNING, lambda rec: start(rec, "started by operator")
        )

    @finishes
    async def stop_agents(self, selection: Selection, timeout: float | None = None) -> list[BulkOutcome]:
        check_grace(timeout)
        stop = functools.partial(self._supervisor.stop, reason="stopped by operator", timeout=timeout)
        return await self._bulk.run(selection, DesiredState.STOPPED, stop, self._supervisor.begin_stop)

    @finishes
    async def restart_agents(self, selection: Selection) -> list[BulkOutcome]:
        again = functools.partial(self._supervisor.restart, reason="restarted by operator")
        return await self._bulk.run(selection, DesiredState.RUNNING, again, self._supervisor.begin_stop)

    def spec_defaults(self, name: str = "") -> AgentSpec:
        return AgentSpec(
            name=name,
            command=(),
            restart_policy=self.settings.default_restart_policy,
            stop_timeout=self.settings.default_stop_timeout,
            runtime=self.settings.default_runtime,
        )

    @finishes
    async def create_agent(
        self, fields: Mapping[str, Any], agent_id: str = "", start: bool = False
    ) -> AgentRecord:
        """Register an agent from spec fields (AgentSpec field names; unset ones default)."""
        spec = apply_fields(self.spec_defaults(), fields)
        check_spec(spec)
        self._runtime.check_spec(spec)
        agent_id = agent_id or agent_id_from_name(spec.name)
        check_agent_id(agent_id)
        self._runtime.check_spec(spec, agent_id=agent_id)
        return await self._register(agent_id, spec, AgentSource.REGISTERED, "", start or spec.autostart)

    @finishes
    async def create_agent_from_manifest(
        self, path: str, agent_id: str = "", start: bool = False
    ) -> AgentRecord:
        if not Path(path).is_absolute():
            raise InvalidArgument.single("manifest_path", f"{path!r} must be an absolute path")
        try:
            # Off the event loop: a slow file system must not stall the daemon.
            manifest = await asyncio.to_thread(load_manifest, Path(path), self.spec_defaults())
        except ManifestError as exc:
            raise InvalidArgument.single("manifest_path", str(exc)) from exc
        agent_id = agent_id or manifest.agent_id
        check_agent_id(agent_id)
        self._runtime.check_spec(manifest.spec, field=f"manifest_path ({path}): ", agent_id=agent_id)
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

            def unregister() -> None:  # back to what the store holds: nothing, or the tombstone
                self._registry.restore(agent_id, existing)
                if existing is None:
                    self._writes.forget(agent_id, rec.created_at)
                else:
                    self._writes.write(existing.copy(), None)

            await self._commits.change(rec, unregister)
            log.info("agent registered", agent_id=agent_id, source=source.value)
            started = await self._supervisor.start(rec, "started at registration") if start else None
        if started is not None:
            await self._commits.observed(agent_id)
            await self._commits.observed_after(agent_id, self._supervisor.settled(started))
        return rec

    @finishes
    async def update_agent(self, agent_id: str, fields: Mapping[str, Any]) -> AgentRecord:
        if not fields:
            raise InvalidArgument.single("update_mask", "names no field to change")
        async with self._supervisor.lock(agent_id):
            rec = self.get_agent(agent_id)
            spec = apply_fields(rec.spec, fields)
            check_spec(spec)
            self._runtime.check_spec(spec, agent_id=agent_id)
            previous, rec.spec = rec.spec, spec
            self._registry.save(rec)

            def undo() -> None:
                rec.spec = previous  # what the store still holds
                self._registry.save(rec)

            await self._commits.change(rec, undo)
            log.info("agent updated", agent_id=agent_id, fields=sorted(fields))
        return rec

    @finishes
    async def delete_agent(self, agent_id: str) -> OperationResult:
        """Stop and remove the agent; changed is False when it was already deleted."""
        check_agent_id(agent_id)
        async with self._supervisor.lock(agent_id):
            rec = self._registry.get_any(agent_id)
            if rec is None:
                raise NotFound("agent", agent_id)
            if rec.deleted:
                return OperationResult(rec, False, f"agent {agent_id} was already deleted")
            self._local_agent(agent_id)
            # Stopped for good first (committed), then the tombstone: a failure between the two
            # leaves a stopped agent, never a deleted one still running.
            await self._commits.desired(rec, DesiredState.STOPPED)
            await self._supervisor.stop(rec, "deleted by operator")
            # The row stays as a tombstone, so discovery does not bring a deleted agent back.
            rec.deleted = True
            self._registry.save(rec)

            def undo() -> None:
                rec.deleted = False
                self._registry.save(rec)

            await self._commits.change(rec, undo)
            self._registry.announce_deletion(rec, "deleted by operator")
            self._metrics.forget(agent_id)
            self._writes.forget_heartbeat(agent_id)
            self._supervisor.logins.forget(agent_id)
            log.info("agent deleted", agent_id=agent_id)
        return OperationResult(rec, True, f"agent {agent_id} deleted")

    async def discover(self) -> DiscoveryReport:
        """Scan the agents directories; register new packages, refresh changed manifests.

        UNAVAILABLE when what it found could not be committed: it is kept and retried (a
        discovered package is the file system's truth, not an operator's change to undo)."""
        report = await self._discovery.discover()
        try:
            await self._writes.flushed()
        except StoreRejected as exc:
            log.error("the store refused a discovered agent", error=str(exc))
        except StoreError as exc:
            raise Unavailable(f"discovery's changes are not yet committed (kept, retried): {exc}") from exc
        return report
