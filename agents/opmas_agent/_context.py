"""What an agent is told by its environment: identity, NATS, subject prefix, intervals.

opmasd sets AGENT_ID, AGENT_NAME, AGENT_TYPE, AGENT_VERSION, AGENT_HEARTBEAT_INTERVAL and
NATS_URL (DESIGN §4); everything has a default so an agent also runs by hand with no
environment at all, against a NATS on localhost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_PREFIX = "agent"
# A subject token may not hold whitespace, dots (token separators) or wildcards.
_TOKEN = re.compile(r"^[^\s.*>]+$")
_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY", re.IGNORECASE)
REDACTED = "***"
T = TypeVar("T")


class ConfigError(Exception):
    """A setting has a value the agent cannot run with; the agent exits with code 2."""


def is_secret(name: str) -> bool:
    """Whether a setting's name says it holds a secret (password, token, key...)."""
    return bool(_SECRET_NAME.search(name))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parser_for(name: str, default: T) -> Callable[[str], T]:
    """How to read a setting whose default is `default`: bool, int, float or str."""
    parser: Callable[[str], Any]
    if isinstance(default, bool):
        parser = _parse_bool
    elif isinstance(default, int | float | str):
        parser = type(default)
    else:
        raise TypeError(f"setting {name}: pass parse= for a {type(default).__name__} default")
    return cast("Callable[[str], T]", parser)


def redact_url(url: str) -> str:
    """The URL with any password replaced, so it can be logged or returned by `config`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{host}"))


def _seconds(environ: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw.removesuffix("s"))
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
        raise ConfigError(f"{name}={raw!r}: must be {kind}")
    return value


def _subject_token(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip() or default
    # The prefix may itself be dotted ("site1.agent"), each part a valid token.
    if not all(_TOKEN.match(part) for part in value.split(".")):
        raise ConfigError(f"{name}={value!r}: not a valid NATS subject (no spaces, wildcards or empty parts)")
    return value


@dataclass(frozen=True)
class AgentContext:
    """The agent's identity and connection settings, read once at start.

    Args:
        agent_id: stable id (AGENT_ID); the subjects `{prefix}.{agent_id}.command|query|response`.
        name, type, version: from the manifest (AGENT_NAME, AGENT_TYPE, AGENT_VERSION).
        heartbeat_interval: seconds between heartbeats (AGENT_HEARTBEAT_INTERVAL, default 30).
        stop_timeout: seconds the manager waits after SIGTERM before SIGKILL (AGENT_STOP_TIMEOUT,
            default 10); the SDK fits its shutdown inside it.
        nats_url: NATS_URL (default nats://127.0.0.1:4222); may hold user:password.
        nats_user, nats_password: NATS_USER / NATS_PASSWORD, when the URL holds none (opmasd's
            embedded NATS server gives each agent its own login, allowed only its own subjects).
        nats_inbox_prefix: where replies to the agent's own requests go (NATS_INBOX_PREFIX,
            default `_INBOX.{agent_id}`: the only inboxes its login may read).
        subject_prefix: NATS_SUBJECT_PREFIX (default "agent"), so installations can share a NATS.
        log_level: AGENT_LOG_LEVEL (debug, info, warning, error; default info).
        env: the whole environment, for the agent's own settings (see `Agent.setting`).
    """

    agent_id: str
    name: str = ""
    type: str = "generic"
    version: str = "0.0.0"
    heartbeat_interval: float = 30.0
    stop_timeout: float = 10.0
    nats_url: str = DEFAULT_NATS_URL
    nats_user: str = ""
    nats_password: str = field(default="", repr=False)
    nats_inbox_prefix: str = ""
    subject_prefix: str = DEFAULT_PREFIX
    log_level: str = "info"
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], default_id: str = "agent") -> AgentContext:
        """Read the context from an environment; ConfigError names the variable that is wrong."""
        agent_id = environ.get("AGENT_ID", "").strip() or default_id
        if not _TOKEN.match(agent_id):
            raise ConfigError(f"AGENT_ID={agent_id!r}: not usable in a NATS subject")
        level = environ.get("AGENT_LOG_LEVEL", "").strip().lower() or "info"
        if level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"AGENT_LOG_LEVEL={level!r}: one of debug, info, warning, error")
        url = environ.get("NATS_URL", "").strip() or DEFAULT_NATS_URL
        for one in url.split(","):
            parts = urlsplit(one.strip())
            if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
                raise ConfigError(f"NATS_URL={redact_url(url)!r}: expected nats://host:port[,nats://...]")
        return cls(
            agent_id=agent_id,
            name=environ.get("AGENT_NAME", "").strip() or agent_id,
            type=environ.get("AGENT_TYPE", "").strip() or "generic",
            version=environ.get("AGENT_VERSION", "").strip() or "0.0.0",
            heartbeat_interval=_seconds(environ, "AGENT_HEARTBEAT_INTERVAL", 30.0),
            # 0: opmasd SIGKILLs at once after SIGTERM (a stop_timeout of 0 is allowed).
            stop_timeout=_seconds(environ, "AGENT_STOP_TIMEOUT", 10.0, allow_zero=True),
            nats_url=url,
            nats_user=environ.get("NATS_USER", ""),
            nats_password=environ.get("NATS_PASSWORD", ""),
            nats_inbox_prefix=_subject_token(environ, "NATS_INBOX_PREFIX", f"_INBOX.{agent_id}"),
            subject_prefix=_subject_token(environ, "NATS_SUBJECT_PREFIX", DEFAULT_PREFIX),
            log_level=level,
            env=dict(environ),
        )

    def subject(self, kind: str) -> str:
        """`{prefix}.{agent_id}.{kind}` for this agent's own subjects (status, metrics, command,
        query, response)."""
        return f"{self.subject_prefix}.{self.agent_id}.{kind}"

    def describe(self) -> dict[str, Any]:
        """The context as the `config` command shows it: no password, URL redacted."""
        return {
            "agent_id": self.agent_id,
            "name": self.name,
            "type": self.type,
            "version": self.version,
            "heartbeat_interval": self.heartbeat_interval,
            "stop_timeout": self.stop_timeout,
            "nats_url": redact_url(self.nats_url),
            "nats_user": self.nats_user or None,
            "nats_inbox_prefix": self.nats_inbox_prefix or None,
            "subject_prefix": self.subject_prefix,
            "log_level": self.log_level,
        }
