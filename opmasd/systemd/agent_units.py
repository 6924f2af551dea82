"""The systemd runtime as the configuration asks for it (agents.systemd, agents.systemd_bus,
agents.systemd_root, agents.systemd_journal): connected at start, or refused with why.

"auto" connects where systemd's bus answers and otherwise leaves the systemd runtime refused
(an agent asking for it is told why); "required" stops the start instead; "off" never
connects. A key that only the systemd runtime reads is refused with "off", and so is
agents.runtime: systemd, rather than being accepted and ignored (config.loading checks it).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from opmasd.config.loading import ConfigError
from opmasd.config.schema import AgentsConfig
from opmasd.core.errors import BackendError
from opmasd.core.model import RuntimeKind
from opmasd.runtime.systemd import SystemdRuntime
from opmasd.runtime.systemd_journal import JournalSource

log = structlog.get_logger(__name__)


async def connect_systemd(agents: AgentsConfig, source: str) -> tuple[SystemdRuntime | None, str]:
    """The connected systemd runtime, or None and why there is none. ConfigError when the
    configuration requires it (agents.systemd: required, or agents.runtime: systemd) and it
    cannot be had."""
    if agents.systemd == "off":
        return None, "agents.systemd is off"
    bus = agents.systemd_bus or ("system" if os.geteuid() == 0 else "user")
    root = agents.systemd_root or Path("/")
    journal = JournalSource(directory=agents.systemd_journal) if agents.systemd_journal else None
    runtime = SystemdRuntime(bus, journal, root=root)
    try:
        await runtime.connect()
    except BackendError as exc:
        why = f"systemd's {bus} bus did not answer: {exc}"
        if agents.systemd == "required" or agents.runtime is RuntimeKind.SYSTEMD:
            key = "agents.systemd" if agents.systemd == "required" else "agents.runtime"
            raise ConfigError(source, key, f"needs the systemd runtime, but {why}") from exc
        log.info("the systemd runtime is not available", reason=why)
        return None, why
    log.info("the systemd runtime is available", bus=bus)
    return runtime, ""
