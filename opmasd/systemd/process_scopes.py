"""Where process-runtime agents' trees live, as configured: systemd scopes, else cgroups.

Scopes (agents.process_scopes):
"auto" uses them where opmasd runs as a service of a systemd that its bus reaches (the bus of
agents.systemd_bus, else the system bus as root and the user bus otherwise), and otherwise
leaves agents in opmasd's own cgroup, as before; "on" stops the start instead, with why; "off"
never. Scopes hold each agent's tree, so they are refused with `agents.cgroups: off`.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from opmasd.config.loading import ConfigError
from opmasd.config.schema import AgentsConfig
from opmasd.runtime.cgroups import AgentCgroups
from opmasd.runtime.process_scopes import ProcessScopes

log = structlog.get_logger(__name__)


async def connect_process_scopes(agents: AgentsConfig, source: str) -> ProcessScopes | None:
    """The connected scopes, or None. ConfigError when "on" and they cannot be had."""
    setting = agents.process_scopes
    if setting == "off":
        return None
    if agents.cgroups == "off":
        if setting == "on":
            raise ConfigError(
                source, "agents.process_scopes", "on, but agents.cgroups is off (a scope is a cgroup)"
            )
        log.info("process-runtime agents stay in opmasd's cgroup (agents.cgroups: off)")
        return None
    bus = agents.systemd_bus or ("system" if os.geteuid() == 0 else "user")
    scopes, why = await ProcessScopes.connect(bus)
    if scopes is None:
        if setting == "on":
            raise ConfigError(source, "agents.process_scopes", f"on, but {why}")
        log.info("process-runtime agents stay in opmasd's cgroup: no scopes", reason=why)
        return None
    log.info("process-runtime agents run in transient scopes", detail=why)
    return scopes


def agent_cgroups(agents: AgentsConfig, state_dir: Path, source: str) -> AgentCgroups | None:
    """Without scopes: a cgroup per agent where the host allows it (agents.cgroups); refused
    when required."""
    setting = agents.cgroups
    if setting == "off":
        log.info("agent process trees tracked by process group (agents.cgroups: off)")
        return None
    cgroups, why = AgentCgroups.detect(state_dir)
    if cgroups is None and setting == "required":
        raise ConfigError(source, "agents.cgroups", f"required, but no cgroup can be used: {why}")
    if cgroups is None:
        log.warning("agent process trees tracked by process group: no cgroup per agent", reason=why)
    else:
        log.info("agent process trees tracked by cgroup", detail=why)
    return cgroups
