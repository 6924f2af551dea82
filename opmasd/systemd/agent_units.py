"""The systemd runtime as the configuration asks for it (agents.systemd, agents.systemd_bus,
agents.systemd_root, agents.systemd_journal): connected at start, or refused with why.

"auto" connects where systemd's bus answers and otherwise leaves the systemd runtime refused
(an agent asking for it is told why); "required" stops the start instead; "off" never
connects. A key that only the systemd runtime reads is refused with "off", and so is
agents.runtime: systemd, rather than being accepted and ignored (config.loading checks it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from opmasd.config.loading import ConfigError
from opmasd.config.schema import AgentsConfig
from opmasd.core.errors import BackendError
from opmasd.core.model import RuntimeKind
from opmasd.runtime.systemd import SystemdRuntime
from opmasd.runtime.systemd_journal import JournalSource
from opmasd.runtime.systemd_owner import load_instance_id

log = structlog.get_logger(__name__)

ENV_SUBDIR = "systemd-env"  # the units' environment files, under the runtime directory


async def connect_systemd(
    agents: AgentsConfig, source: str, state_dir: Path, runtime_dir: Path, hidden: Sequence[Path] = ()
) -> tuple[SystemdRuntime | None, str]:
    """The connected systemd runtime, or None and why there is none. ConfigError when the
    configuration requires it (agents.systemd: required, or agents.runtime: systemd) and it
    cannot be had. Its units carry this opmasd's instance id (runtime.systemd_owner, kept in
    state_dir) and their environments go in files under runtime_dir (runtime.systemd_env);
    neither directory, nor the `hidden` paths (the log directory, the configuration), is
    visible to an agent unit."""
    if agents.systemd == "off":
        return None, "agents.systemd is off"
    bus = agents.systemd_bus or ("system" if os.geteuid() == 0 else "user")
    root = agents.systemd_root or Path("/")
    journal = JournalSource(directory=agents.systemd_journal) if agents.systemd_journal else None
    try:
        instance = load_instance_id(state_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(source, "service.state_dir", f"cannot keep the instance id there: {exc}") from exc
    secret = tuple(str(path) for path in (state_dir, runtime_dir, *hidden))
    runtime = SystemdRuntime(
        bus, journal, root=root, instance=instance, env_dir=runtime_dir / ENV_SUBDIR, hidden=secret
    )
    try:
        await runtime.connect()
    except BackendError as exc:
        why = f"systemd's {bus} bus did not answer: {exc}"
        if agents.systemd == "required" or agents.runtime is RuntimeKind.SYSTEMD:
            key = "agents.systemd" if agents.systemd == "required" else "agents.runtime"
            raise ConfigError(source, key, f"needs the systemd runtime, but {why}") from exc
        log.info("the systemd runtime is not available", reason=why)
        return None, why
    log.info("the systemd runtime is available", bus=bus, instance=instance)
    return runtime, ""
