"""What an agent's process is started with: its command, directory and complete environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from opmasd.core.model import AgentRecord
from opmasd.runtime.base import LaunchRequest

# Variables of the daemon's own environment that must not leak into agents: they would make
# an agent talk to systemd, read opmasd's configuration, or keep its state in opmasd's
# directories (systemd's StateDirectory= & co. of opmasd's unit), as if it were opmasd.
_PRIVATE_ENV_PREFIXES = ("OPMAS_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_STREAM", "INVOCATION_ID")
_PRIVATE_ENV = frozenset(
    {
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "LOGS_DIRECTORY",
        "CACHE_DIRECTORY",
        "CONFIGURATION_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
        "SYSTEMD_EXEC_PID",
        "MAINPID",
        "MANAGERPID",
        "MONITOR_SERVICE_RESULT",
        "MONITOR_EXIT_CODE",
        "MONITOR_EXIT_STATUS",
        "MONITOR_INVOCATION_ID",
        "MONITOR_UNIT",
    }
)


class AgentLogins(Protocol):
    """Each agent's own identity on the message bus (app.py gives the one that fits: the
    embedded NATS server's logins, or none)."""

    def environment(self, agent_id: str) -> Mapping[str, str]:
        """The variables that give the agent its login (NATS_USER, ...); empty for none."""
        ...

    async def admit(self, agent_id: str) -> None:
        """Return once the agent's login works (bounded: a failure is logged, not raised)."""
        ...

    def forget(self, agent_id: str) -> None:
        """The agent is deleted: its login is to stop working."""
        ...


class NoAgentLogins:
    """Agents get no login from opmasd (their spec's environment may give them one)."""

    def environment(self, agent_id: str) -> Mapping[str, str]:
        return {}

    async def admit(self, agent_id: str) -> None:
        return None

    def forget(self, agent_id: str) -> None:
        return None


# What an agent whose spec declares no heartbeat interval is told to use (the SDK's default).
DEFAULT_HEARTBEAT_INTERVAL = 30.0


def agent_base_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment without what is the daemon's alone."""
    return {
        k: v for k, v in environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES) and k not in _PRIVATE_ENV
    }


def launch_request(
    rec: AgentRecord, base_env: Mapping[str, str], daemon_env: Mapping[str, str]
) -> LaunchRequest:
    """The request for rec's process. Later layers win: base, the daemon's (NATS_URL, the
    agent's NATS login, ...), the spec's own environment, then the AGENT_* identity, which an
    agent cannot override."""
    spec = rec.spec
    env = dict(base_env)
    env.update(daemon_env)
    env.update(spec.env)
    env.update(
        AGENT_ID=rec.agent_id,
        AGENT_NAME=spec.name,
        AGENT_TYPE=spec.type,
        AGENT_VERSION=spec.version,
        AGENT_HEARTBEAT_INTERVAL=f"{spec.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL:g}",
        # Seconds between SIGTERM and SIGKILL: the SDK plans its teardown within them.
        AGENT_STOP_TIMEOUT=f"{spec.stop_timeout:g}",
        PYTHONUNBUFFERED="1",
    )
    return LaunchRequest(
        agent_id=rec.agent_id,
        command=spec.command,
        working_directory=spec.working_directory or "/",
        environment=env,
        resources=spec.resources,
        user=spec.user,
        group=spec.group,
        capabilities=spec.capabilities,
        sandbox=spec.sandbox,
    )
