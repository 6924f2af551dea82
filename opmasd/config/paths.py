"""Where opmasd puts its state, runtime files, logs and agents when the configuration does not say.

systemd's StateDirectory=/RuntimeDirectory=/LogsDirectory= come first, then the FHS places for
root, then the XDG places for a user. The runtime directory and socket rule is opmas.local's,
shared with the client.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from opmas.local import (
    default_runtime_dir,
    systemd_directory,
    xdg_directory,
)

# The repository root when running from a checkout: it holds agents/packages.
_CHECKOUT = Path(__file__).resolve().parents[2]
# The agent packages a wheel-installed opmasd ships: package data (scripts/build_wheels.py).
_SHIPPED = Path(__file__).resolve().parents[1] / "shipped_agents"


@dataclass(frozen=True)
class DefaultPaths:
    state_dir: Path
    runtime_dir: Path
    log_dir: Path


def _home(env: Mapping[str, str], euid: int) -> Path:
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        return Path(pwd.getpwuid(euid).pw_dir)
    except KeyError:  # a uid without a passwd entry (containers): nowhere better than /tmp
        return Path(f"/tmp/opmas-{euid}")


def default_log_dir(env: Mapping[str, str], euid: int, state_dir: Path) -> Path:
    """LogsDirectory=, else /var/log/opmas for root, else `logs` in the state directory."""
    logs = systemd_directory(env, "LOGS_DIRECTORY")
    if logs:
        return logs
    return Path("/var/log/opmas") if euid == 0 else state_dir / "logs"


def default_paths(env: Mapping[str, str], euid: int | None = None) -> DefaultPaths:
    """Where state, runtime files and logs go when the configuration does not say."""
    euid = os.geteuid() if euid is None else euid
    state = systemd_directory(env, "STATE_DIRECTORY")
    if state is None:
        if euid == 0:
            state = Path("/var/lib/opmas")
        else:
            state = (xdg_directory(env, "XDG_STATE_HOME") or _home(env, euid) / ".local" / "state") / "opmas"
    return DefaultPaths(state, default_runtime_dir(env, euid), default_log_dir(env, euid, state))


def default_agent_dirs(checkout: Path = _CHECKOUT, shipped: Path = _SHIPPED) -> tuple[Path, ...]:
    """agents/packages of the checkout this runs from; else the shipped agents and /etc/opmas/agents.d.

    The shipped agents are the installed package's own (opmasd/shipped_agents, installed with the
    code that runs them), else /usr/lib/opmas/agents for an install that puts them there: one
    place, never both, so the same agent is not found twice.
    """
    packages = checkout / "agents" / "packages"
    if packages.is_dir():
        return (packages,)
    return (shipped if shipped.is_dir() else Path("/usr/lib/opmas/agents"), Path("/etc/opmas/agents.d"))
