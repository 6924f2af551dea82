"""Discovery: bring the registry in line with the agent packages found on disk.

A new package becomes an agent (started when its manifest, or agents.autostart, says so); a
changed manifest updates the agent's spec, applied at its next start; a package whose id
another agent already has is reported, not taken; a deleted agent stays deleted (its
tombstone keeps discovery from bringing it back).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from opmasd.core.errors import FailedPrecondition
from opmasd.core.model import AgentRecord, AgentSource, AgentSpec
from opmasd.manager.packages.manifest import Manifest, ManifestError
from opmasd.manager.packages.scan import scan
from opmasd.manager.registry import AgentRegistry
from opmasd.manager.settings import ManagerSettings
from opmasd.manager.supervisor import Supervisor
from opmasd.manager.values import DiscoveredAgent, DiscoveryReport

log = structlog.get_logger(__name__)


class PackageDiscovery:
    def __init__(
        self,
        registry: AgentRegistry,
        supervisor: Supervisor,
        settings: Callable[[], ManagerSettings],
        spec_defaults: Callable[[], AgentSpec],
        refusals: Callable[[AgentSpec, str], list[tuple[str, str]]] = lambda spec, agent_id: [],
    ) -> None:
        """refusals: what of a spec's runtime and limits this daemon cannot enforce (a manifest
        asking for it is reported, not registered)."""
        self._registry = registry
        self._supervisor = supervisor
        self._settings = settings
        self._spec_defaults = spec_defaults
        self._refusals = refusals
        self._lock = asyncio.Lock()
        self.last_report = DiscoveryReport()

    async def discover(self) -> DiscoveryReport:
        """Scan the agents directories; register new packages, refresh changed manifests."""
        async with self._lock:
            settings = self._settings()
            # Off the event loop: reading many manifests (or one on a slow mount) takes a while.
            found = await asyncio.to_thread(scan, settings.agent_dirs, self._spec_defaults())
            report = DiscoveryReport(errors=list(found.errors))
            for manifest in found.manifests:
                async with self._supervisor.lock(manifest.agent_id):
                    await self._apply(manifest, settings, report)
            self.last_report = report
        return report

    async def _apply(self, manifest: Manifest, settings: ManagerSettings, report: DiscoveryReport) -> None:
        agent_id = manifest.agent_id
        path = str(manifest.path)
        refused = self._refusals(manifest.spec, agent_id)
        if refused:
            why = "; ".join(f"{field}: {reason}" for field, reason in refused)
            report.errors.append(ManifestError(manifest.path, why))
            return
        rec = self._registry.get_any(agent_id)
        if rec is None:
            rec = AgentRecord(
                agent_id=agent_id,
                spec=manifest.spec,
                source=AgentSource.DISCOVERED,
                manifest_path=path,
                node=settings.node,
                state_reason="discovered",
            )
            self._registry.save(rec)
            log.info("agent discovered", agent_id=agent_id, manifest=path)
            report.agents.append(DiscoveredAgent(agent_id, manifest.spec.name, path, True))
            if manifest.spec.autostart or settings.autostart_discovered:
                await self._start_quietly(rec, "started at discovery (autostart)")
            return
        if rec.deleted:
            return
        if rec.manifest_path != path:
            report.errors.append(
                ManifestError(manifest.path, f"agent id {agent_id!r} is already used by another agent")
            )
            return
        if rec.spec != manifest.spec:
            rec.spec = manifest.spec
            self._registry.save(rec)
            log.info("agent manifest changed; applies at next start", agent_id=agent_id)
        report.agents.append(DiscoveredAgent(agent_id, manifest.spec.name, path, False))

    async def _start_quietly(self, rec: AgentRecord, reason: str) -> None:
        try:
            await self._supervisor.start(rec, reason)
        except FailedPrecondition as exc:
            log.warning("agent did not start", agent_id=rec.agent_id, error=exc.message)
