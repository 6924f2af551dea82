"""Typed configuration: defaults, then the YAML file, then OPMAS_<SECTION>_<KEY> variables.

Everything is checked when loaded, so a bad value stops the daemon at start with the file, the
key and the reason, instead of surfacing later as an odd failure deep in some subsystem.
"""

from __future__ import annotations

import difflib
import os
import pwd
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opmasd.config_types import (
    load_yaml,
    parse_address,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_int,
    parse_mode,
    parse_nats_subject_prefix,
    parse_node,
    parse_optional_path,
    parse_path,
    parse_path_list,
    parse_size,
    parse_str,
    parse_url,
)

DEFAULT_CONFIG_PATH = Path("/etc/opmas/opmasd.yaml")
SOCKET_NAME = "opmasd.sock"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "console", "json", "journal"]
RestartPolicy = Literal["never", "on-failure", "always"]


class ConfigError(Exception):
    """A configuration problem: `source` is the file or the environment variable's origin."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class ServiceConfig:
    node: str
    state_dir: Path
    runtime_dir: Path
    log_dir: Path
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    discovery_interval: float = 60.0
    monitoring_interval: float = 5.0
    cleanup_interval: float = 3600.0
    stop_agents_on_shutdown: bool = True


@dataclass(frozen=True)
class DatabaseConfig:
    url: str  # always concrete once loaded: the default is the SQLite file in state_dir
    pool_size: int = 5


@dataclass(frozen=True)
class NatsConfig:
    url: str = ""  # "" = start the embedded nats-server
    user: str = ""
    password: str = field(default="", repr=False)
    tls_verify: bool = True
    subject_prefix: str = "agent"
    heartbeat_timeout: float = 90.0


@dataclass(frozen=True)
class GrpcConfig:
    socket: Path | None  # None = no unix socket
    socket_mode: int = 0o660
    address: str | None = "127.0.0.1:50051"  # None = no TCP listener
    grace_period: float = 5.0


@dataclass(frozen=True)
class RestConfig:
    address: str | None = "127.0.0.1:8000"  # None = no REST listener
    enabled: bool = True


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    tokens_file: Path | None = None


@dataclass(frozen=True)
class AgentsConfig:
    dirs: tuple[Path, ...]
    autostart: bool = False
    stop_timeout: float = 10.0
    restart_policy: RestartPolicy = "on-failure"
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0
    max_restarts: int = 5
    log_max_bytes: int = 10 << 20
    log_backups: int = 3


@dataclass(frozen=True)
class Config:
    service: ServiceConfig
    database: DatabaseConfig
    nats: NatsConfig
    grpc: GrpcConfig
    rest: RestConfig
    auth: AuthConfig
    agents: AgentsConfig
    source: Path | None = None  # the file it came from, None when built from defaults only


# --- default directories -------------------------------------------------------------------


@dataclass(frozen=True)
class DefaultPaths:
    state_dir: Path
    runtime_dir: Path
    log_dir: Path


def _systemd_dir(env: Mapping[str, str], name: str) -> Path | None:
    # systemd sets StateDirectory= etc. as colon-separated absolute paths; the first is ours.
    first = env.get(name, "").split(":")[0]
    return Path(first) if first else None


def _xdg_dir(env: Mapping[str, str], name: str) -> Path | None:
    # The XDG spec says relative values are invalid and must be ignored.
    value = env.get(name, "")
    return Path(value) if value.startswith("/") else None


def _home(env: Mapping[str, str], euid: int) -> Path:
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        return Path(pwd.getpwuid(euid).pw_dir)
    except KeyError:  # a uid without a passwd entry (containers): nowhere better than /tmp
        return Path(f"/tmp/opmas-{euid}")


def _default_log_dir(env: Mapping[str, str], euid: int, state_dir: Path) -> Path:
    logs = _systemd_dir(env, "LOGS_DIRECTORY")
    if logs:
        return logs
    return Path("/var/log/opmas") if euid == 0 else state_dir / "logs"


def default_paths(env: Mapping[str, str], euid: int | None = None) -> DefaultPaths:
    """Where state, runtime files and logs go when the configuration does not say."""
    euid = os.geteuid() if euid is None else euid
    state = _systemd_dir(env, "STATE_DIRECTORY")
    if state is None:
        if euid == 0:
            state = Path("/var/lib/opmas")
        else:
            state = (_xdg_dir(env, "XDG_STATE_HOME") or _home(env, euid) / ".local" / "state") / "opmas"
    runtime = _systemd_dir(env, "RUNTIME_DIRECTORY")
    if runtime is None:
        if euid == 0:
            runtime = Path("/run/opmas")
        else:
            xdg_runtime = _xdg_dir(env, "XDG_RUNTIME_DIR")
            runtime = xdg_runtime / "opmas" if xdg_runtime else Path(f"/tmp/opmas-{euid}")
    return DefaultPaths(state, runtime, _default_log_dir(env, euid, state))


def default_socket_path(env: Mapping[str, str], euid: int | None = None) -> Path:
    """The gRPC unix socket a client should try when told nothing.

    A non-root operator usually talks to the system daemon (which runs as its own user with
    RuntimeDirectory=opmas), so when there is no per-user daemon socket but the system one
    exists, that is the answer.
    """
    euid = os.geteuid() if euid is None else euid
    own = default_paths(env, euid).runtime_dir / SOCKET_NAME
    system = Path("/run/opmas") / SOCKET_NAME
    if euid != 0 and "RUNTIME_DIRECTORY" not in env and not own.exists() and system.exists():
        return system
    return own


def default_agent_dirs() -> tuple[Path, ...]:
    checkout = Path(__file__).resolve().parent.parent / "agents" / "packages"
    if checkout.is_dir():
        return (checkout,)
    return (Path("/usr/lib/opmas/agents"), Path("/etc/opmas/agents.d"))


# --- schema --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    parse: Callable[[object], Any]
    paths: bool = False  # relative paths are resolved against the file's folder


_POSITIVE = parse_duration(positive=True)
_NON_NEGATIVE = parse_duration(positive=False)


def _grpc_socket(value: object) -> Path | str | None:
    text = parse_str(value).strip()
    if text == "":
        return ""  # resolved to <runtime_dir>/opmasd.sock once runtime_dir is known
    if text.lower() == "none":
        return None
    return parse_path(text)


_SCHEMA: dict[str, dict[str, _Key]] = {
    "service": {
        "node": _Key(parse_node),
        "state_dir": _Key(parse_path, paths=True),
        "runtime_dir": _Key(parse_path, paths=True),
        "log_dir": _Key(parse_path, paths=True),
        "log_level": _Key(parse_choice("debug", "info", "warning", "error")),
        "log_format": _Key(parse_choice("auto", "console", "json", "journal")),
        "discovery_interval": _Key(_POSITIVE),
        "monitoring_interval": _Key(_POSITIVE),
        "cleanup_interval": _Key(_POSITIVE),
        "stop_agents_on_shutdown": _Key(parse_bool),
    },
    "database": {
        "url": _Key(
            parse_url(("sqlite", "postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2"))
        ),
        "pool_size": _Key(parse_int(minimum=1)),
    },
    "nats": {
        "url": _Key(parse_url(("nats", "tls", "ws", "wss"))),
        "user": _Key(parse_str),
        "password": _Key(parse_str),
        "tls_verify": _Key(parse_bool),
        "subject_prefix": _Key(parse_nats_subject_prefix),
        "heartbeat_timeout": _Key(_POSITIVE),
    },
    "grpc": {
        "socket": _Key(_grpc_socket, paths=True),
        "socket_mode": _Key(parse_mode),
        "address": _Key(parse_address),
        "grace_period": _Key(_NON_NEGATIVE),
    },
    "rest": {
        "address": _Key(parse_address),
        "enabled": _Key(parse_bool),
    },
    "auth": {
        "enabled": _Key(parse_bool),
        "tokens_file": _Key(parse_optional_path, paths=True),
    },
    "agents": {
        "dirs": _Key(parse_path_list, paths=True),
        "autostart": _Key(parse_bool),
        "stop_timeout": _Key(_NON_NEGATIVE),
        "restart_policy": _Key(parse_choice("never", "on-failure", "always")),
        "backoff_initial": _Key(_NON_NEGATIVE),
        "backoff_max": _Key(_NON_NEGATIVE),
        "stable_after": _Key(_NON_NEGATIVE),
        "max_restarts": _Key(parse_int(minimum=0)),
        "log_max_bytes": _Key(parse_size),
        "log_backups": _Key(parse_int(minimum=0)),
    },
}


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- reading -------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, dict[str, object]]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, None, f"cannot read: {exc}") from exc
    try:
        document = load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(name, None, f"{where}{exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(name, None, f"invalid YAML: {exc}") from exc
    if document is None:  # an empty file (or only comments) is a valid "all defaults"
        return {}
    if not isinstance(document, dict):
        raise ConfigError(name, None, f"must be a mapping of sections, got {type(document).__name__}")
    sections: dict[str, dict[str, object]] = {}
    for section, body in document.items():
        if section not in _SCHEMA:
            hint = _suggest(str(section), list(_SCHEMA))
            raise ConfigError(name, str(section), f"unknown section{hint}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(name, section, f"must be a mapping of keys, got {type(body).__name__}")
        for key in body:
            if key not in _SCHEMA[section]:
                hint = _suggest(str(key), list(_SCHEMA[section]))
                raise ConfigError(name, f"{section}.{key}", f"unknown key{hint}")
        # A key written with no value (`url:`) means "the default", as if it were absent.
        sections[section] = {key: value for key, value in body.items() if value is not None}
    return sections


def _read_env(env: Mapping[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
    """OPMAS_<SECTION>_<KEY> values by section and key, each with the variable's name.

    Variables whose section is not one of ours (OPMAS_CONFIG, OPMAS_SERVER for the client,
    test settings) belong to someone else and are left alone.
    """
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for variable, value in env.items():
        if not variable.startswith("OPMAS_"):
            continue
        rest = variable.removeprefix("OPMAS_")
        section = next((s for s in _SCHEMA if rest.startswith(s.upper() + "_")), None)
        if section is None:
            continue
        key = rest.removeprefix(section.upper() + "_").lower()
        if key not in _SCHEMA[section]:
            known = [f"OPMAS_{section.upper()}_{k.upper()}" for k in _SCHEMA[section]]
            raise ConfigError("environment", variable, f"unknown variable{_suggest(variable, known)}")
        found.setdefault(section, {})[key] = (value, variable)
    return found


def _absolute(value: object, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else base / value
    if isinstance(value, tuple):
        return tuple(_absolute(item, base) for item in value)
    return value


def load_config(path: Path | None, env: Mapping[str, str], *, euid: int | None = None) -> Config:
    """Defaults, then the file (given, else /etc/opmas/opmasd.yaml if present), then env."""
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    file_values = _read_file(path) if path is not None else {}
    env_values = _read_env(env)
    # Relative paths in the file are relative to the file, as an operator reading it expects;
    # relative paths from the environment are relative to the working directory.
    file_base = path.resolve().parent if path is not None else Path.cwd()

    values: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], tuple[str, str]] = {}  # (section, key) -> (source, key label)
    for section, keys in _SCHEMA.items():
        values[section] = {}
        for key, spec in keys.items():
            raw: object
            if key in env_values.get(section, {}):
                raw, variable = env_values[section][key]
                source, label, base = "environment", variable, Path.cwd()
            elif key in file_values.get(section, {}):
                raw = file_values[section][key]
                source, label, base = str(path), f"{section}.{key}", file_base
            else:
                continue
            try:
                parsed = spec.parse(raw)
            except ValueError as exc:
                raise ConfigError(source, label, str(exc)) from None
            values[section][key] = _absolute(parsed, base) if spec.paths else parsed
            origins[(section, key)] = (source, label)

    return _build(values, origins, env, os.geteuid() if euid is None else euid, path)


def _build(
    values: dict[str, dict[str, Any]],
    origins: dict[tuple[str, str], tuple[str, str]],
    env: Mapping[str, str],
    euid: int,
    path: Path | None,
) -> Config:
    service = values["service"]
    defaults = default_paths(env, euid)
    service.setdefault("node", socket.gethostname())
    service.setdefault("state_dir", defaults.state_dir)
    service.setdefault("runtime_dir", defaults.runtime_dir)
    service.setdefault("log_dir", _default_log_dir(env, euid, service["state_dir"]))

    database = values["database"]
    if not database.get("url"):
        database["url"] = f"sqlite:///{service['state_dir'] / 'opmas.db'}"

    grpc = values["grpc"]
    if grpc.get("socket", "") == "":
        grpc["socket"] = service["runtime_dir"] / SOCKET_NAME

    agents = values["agents"]
    agents.setdefault("dirs", default_agent_dirs())
    backoff_initial = agents.get("backoff_initial", AgentsConfig.backoff_initial)
    backoff_max = agents.get("backoff_max", AgentsConfig.backoff_max)
    if backoff_max < backoff_initial:
        key = "backoff_max" if ("agents", "backoff_max") in origins else "backoff_initial"
        source, label = origins[("agents", key)]
        raise ConfigError(
            source,
            label,
            f"agents.backoff_max ({backoff_max:g}s) must be >= agents.backoff_initial ({backoff_initial:g}s)",
        )

    return Config(
        service=ServiceConfig(**service),
        database=DatabaseConfig(**database),
        nats=NatsConfig(**values["nats"]),
        grpc=GrpcConfig(**grpc),
        rest=RestConfig(**values["rest"]),
        auth=AuthConfig(**values["auth"]),
        agents=AgentsConfig(**agents),
        source=path,
    )
