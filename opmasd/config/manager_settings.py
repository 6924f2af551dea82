"""The manager's settings as a configuration gives them (opmasd.app builds the manager with
these at start and hands a reload's new ones to it)."""

from __future__ import annotations

from opmasd.config.schema import Config
from opmasd.manager import HealthSettings, ManagerSettings, RestartSettings


def manager_settings(config: Config) -> ManagerSettings:
    agents = config.agents
    return ManagerSettings(
        node=config.service.node,
        agent_dirs=tuple(agents.dirs),
        restart=RestartSettings(
            backoff_initial=agents.backoff_initial,
            backoff_max=agents.backoff_max,
            stable_after=agents.stable_after,
            max_restarts=agents.max_restarts,
        ),
        default_stop_timeout=agents.stop_timeout,
        default_restart_policy=agents.restart_policy,
        default_runtime=agents.runtime,
        autostart_discovered=agents.autostart,
        monitoring_interval=config.service.monitoring_interval,
        discovery_interval=config.service.discovery_interval,
        cleanup_interval=config.service.cleanup_interval,
        health=HealthSettings(heartbeat_timeout=config.nats.heartbeat_timeout),
        commit_timeout=config.database.commit_timeout,
    )
