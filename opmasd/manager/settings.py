"""The manager's settings, gathered in one value (the daemon builds it from its configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opmasd.core.model import RestartPolicy, RuntimeKind
from opmasd.manager.heartbeats import HealthSettings
from opmasd.manager.restart import RestartSettings


@dataclass(frozen=True)
class ManagerSettings:
    node: str
    agent_dirs: tuple[Path, ...] = ()
    restart: RestartSettings = RestartSettings()
    default_stop_timeout: float = 10.0
    default_restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    default_runtime: RuntimeKind = RuntimeKind.PROCESS
    # Start discovered agents even when their manifest does not say autostart.
    autostart_discovered: bool = False
    monitoring_interval: float = 5.0
    discovery_interval: float = 60.0
    cleanup_interval: float = 3600.0
    transitions_kept_per_agent: int = 1000
    health: HealthSettings = HealthSettings()
    # How often batched heartbeat times are written to the store.
    heartbeat_flush_interval: float = 1.0
    # How long an operator's change waits for its commit before it is undone (UNAVAILABLE).
    commit_timeout: float = 5.0
