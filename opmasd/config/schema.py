"""What a configuration holds: the sections as typed dataclasses, and each key's value parser.

The dataclasses are what the rest of the daemon reads; `SCHEMA` is what the loader checks a
file and the environment against (a key not in it is unknown, a value its parser refuses is bad).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opmas.local import DEFAULT_TCP_ADDRESS
from opmas.tlsfiles import ServerFiles
from opmas.units import parse_duration, parse_size
from opmasd.bus.embedded_users import DEFAULT_DATA_SUBJECTS
from opmasd.bus.urls import SCHEMES as NATS_SCHEMES
from opmasd.config.nats_agents import parse_subject_patterns
from opmasd.config.parsers import (
    parse_address,
    parse_bool,
    parse_choice,
    parse_group,
    parse_int,
    parse_mode,
    parse_nats_subject_prefix,
    parse_node,
    parse_optional_path,
    parse_path,
    parse_path_list,
    parse_str,
    parse_url,
)
from opmasd.core.model import RestartPolicy, RuntimeKind
from opmasd.logging import FORMATS, LEVELS
from opmasd.store.database import SCHEMES as DATABASE_SCHEMES

# Literals for the type checker; the values themselves are opmasd.logging's LEVELS and FORMATS.
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "console", "json", "journal"]


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
    # How long an operator's change waits for its commit before it is undone (UNAVAILABLE).
    commit_timeout: float = 5.0


@dataclass(frozen=True)
class NatsConfig:
    url: str = ""  # "" = start the embedded nats-server
    user: str = ""
    password: str = field(default="", repr=False)
    # The other ways to log in to an external server (at most one way is set; config/nats_login).
    token: str = field(default="", repr=False)
    creds_file: Path | None = None  # a JWT and NKey seed (.creds), as `nsc` writes it
    nkey_seed_file: Path | None = None
    tls_verify: bool = True
    tls_ca: Path | None = None  # trust this CA (instead of the system's) for tls:// servers
    tls_cert: Path | None = None  # a client certificate for servers that verify clients
    tls_key: Path | None = None
    subject_prefix: str = "agent"
    heartbeat_timeout: float = 90.0
    # What agents may publish / subscribe to besides their own subjects (embedded server only).
    agent_publish: tuple[str, ...] = DEFAULT_DATA_SUBJECTS
    agent_subscribe: tuple[str, ...] = DEFAULT_DATA_SUBJECTS


@dataclass(frozen=True)
class GrpcConfig:
    socket: Path | None  # None = no unix socket
    socket_mode: int = 0o660
    address: str | None = DEFAULT_TCP_ADDRESS  # None = no TCP listener
    grace_period: float = 5.0
    # Connections the TCP address takes at once (the unix socket has a cap of its own).
    max_connections: int = 512
    # A second unix socket whose callers are viewers (read only); None = none. Its folder is
    # made reachable by others (o+x, no listing) when it is the daemon's own.
    viewer_socket: Path | None = None
    viewer_socket_mode: int = 0o666


@dataclass(frozen=True)
class RestConfig:
    address: str | None = "127.0.0.1:8000"  # None = no TCP listener
    enabled: bool = True
    socket: Path | None = None  # a unix socket beside (or instead of) the TCP listener
    socket_mode: int = 0o660
    # Request bodies above this are refused with 413 (the gRPC server takes 4 MiB messages).
    max_body_bytes: int = 4 * 1024 * 1024
    # Connections the TCP address takes at once (the unix socket has a cap of its own).
    max_connections: int = 256


@dataclass(frozen=True)
class AuthConfig:
    # TCP gRPC, REST over TCP and the NATS manager subjects take only callers with an API token
    # (the unix sockets take anyone their mode and group let in, as an admin).
    enabled: bool = True
    # Required to turn `enabled` off: every caller that can connect is then an admin.
    unsafe_allow_unauthenticated: bool = False
    # Required to listen on a non-loopback TCP address without TLS (the tls section): tokens
    # and everything else would cross the network in clear.
    unsafe_allow_plaintext_remote: bool = False
    # The group of the unix sockets (mode grpc.socket_mode / rest.socket_mode): its members
    # are the local admins. None (not set): "opmas" where that group exists and the daemon may
    # give it its sockets, else the daemon's own group; "": the daemon's own group; a name: that
    # group, which must exist (checked at load) and be the daemon's to give (checked at start).
    socket_group: str | None = None


@dataclass(frozen=True)
class TlsConfig:
    """TLS of the TCP listeners (gRPC and REST); the unix sockets stay plain (their file mode is
    their access control). cert and key: both or neither; client_ca (mTLS) needs them."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    # The files as read and checked at load (None without TLS): what the listeners serve. Not
    # compared: a reload with the same paths but new contents is the same configuration.
    files: ServerFiles | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AgentsConfig:
    dirs: tuple[Path, ...]
    autostart: bool = False
    stop_timeout: float = 10.0
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 10.0
    max_restarts: int = 5
    log_max_bytes: int = 10 << 20
    log_backups: int = 3
    # How an agent's whole process tree is kept track of: "auto" uses a cgroup per agent where
    # opmasd may create them (else process groups), "required" refuses to start without them.
    cgroups: str = "auto"
    # Each process-runtime agent (and the log relay) in a transient scope of the systemd running
    # opmasd's unit, so that they outlive it: "auto" where opmasd runs as a service of a systemd
    # its bus reaches, "on" refuses to start elsewhere, "off" never (runtime.process_scopes).
    process_scopes: str = "auto"
    # The runtime of an agent whose spec names none.
    runtime: RuntimeKind = RuntimeKind.PROCESS
    # The systemd runtime (transient units over D-Bus): "auto" where the bus answers at start,
    # "required" refuses to start without it, "off" refuses agents that ask for it.
    systemd: str = "auto"
    # The D-Bus address of systemd's manager ("": the system bus as root, else the user bus) and
    # the journal directory its units log to (None: the host's own journal).
    systemd_bus: str = ""
    systemd_journal: Path | None = None
    # Where that systemd's filesystem (its cgroups, its /proc) is seen from here: None for "/";
    # /proc/PID/root for one in namespaces of its own (a container's).
    systemd_root: Path | None = None


@dataclass(frozen=True)
class Config:
    service: ServiceConfig
    database: DatabaseConfig
    nats: NatsConfig
    grpc: GrpcConfig
    rest: RestConfig
    agents: AgentsConfig
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    source: Path | None = None  # the file it came from, None when built from defaults only


@dataclass(frozen=True)
class Key:
    parse: Callable[[object], Any]
    paths: bool = False  # relative paths are resolved against the file's folder


_POSITIVE = parse_duration(positive=True)
_NON_NEGATIVE = parse_duration(positive=False)
_RESTART_POLICY_NAME = parse_choice(*(policy.value for policy in RestartPolicy))
_RUNTIME_NAME = parse_choice(*(kind.value for kind in RuntimeKind))


def _runtime_kind(value: object) -> RuntimeKind:
    return RuntimeKind(_RUNTIME_NAME(value))


def _restart_policy(value: object) -> RestartPolicy:
    return RestartPolicy(_RESTART_POLICY_NAME(value))


def _grpc_socket(value: object) -> Path | str | None:
    text = parse_str(value).strip()
    if text == "":
        return ""  # resolved to <runtime_dir>/opmasd.sock once runtime_dir is known
    if text.lower() == "none":
        return None
    return parse_path(text)


def _optional_socket(value: object) -> Path | None:
    """A socket path; "" or "none": no socket."""
    text = parse_str(value).strip()
    return None if text.lower() in ("", "none") else parse_path(text)


SCHEMA: dict[str, dict[str, Key]] = {
    "service": {
        "node": Key(parse_node),
        "state_dir": Key(parse_path, paths=True),
        "runtime_dir": Key(parse_path, paths=True),
        "log_dir": Key(parse_path, paths=True),
        "log_level": Key(parse_choice(*LEVELS)),
        "log_format": Key(parse_choice(*FORMATS)),
        "discovery_interval": Key(_POSITIVE),
        "monitoring_interval": Key(_POSITIVE),
        "cleanup_interval": Key(_POSITIVE),
        "stop_agents_on_shutdown": Key(parse_bool),
    },
    "database": {
        "url": Key(parse_url(DATABASE_SCHEMES)),
        "pool_size": Key(parse_int(minimum=1)),
        "commit_timeout": Key(_POSITIVE),
    },
    "nats": {
        "url": Key(parse_url(NATS_SCHEMES)),
        "user": Key(parse_str),
        "password": Key(parse_str),
        "token": Key(parse_str),
        "creds_file": Key(parse_optional_path, paths=True),
        "nkey_seed_file": Key(parse_optional_path, paths=True),
        "tls_verify": Key(parse_bool),
        "tls_ca": Key(parse_optional_path, paths=True),
        "tls_cert": Key(parse_optional_path, paths=True),
        "tls_key": Key(parse_optional_path, paths=True),
        "subject_prefix": Key(parse_nats_subject_prefix),
        "heartbeat_timeout": Key(_POSITIVE),
        "agent_publish": Key(parse_subject_patterns),
        "agent_subscribe": Key(parse_subject_patterns),
    },
    "grpc": {
        "socket": Key(_grpc_socket, paths=True),
        "socket_mode": Key(parse_mode),
        "address": Key(parse_address),
        "grace_period": Key(_NON_NEGATIVE),
        "max_connections": Key(parse_int(minimum=1)),
        "viewer_socket": Key(_optional_socket, paths=True),
        "viewer_socket_mode": Key(parse_mode),
    },
    "rest": {
        "address": Key(parse_address),
        "enabled": Key(parse_bool),
        "socket": Key(parse_optional_path, paths=True),
        "socket_mode": Key(parse_mode),
        "max_body_bytes": Key(parse_size),
        "max_connections": Key(parse_int(minimum=1)),
    },
    "auth": {
        "enabled": Key(parse_bool),
        "unsafe_allow_unauthenticated": Key(parse_bool),
        "unsafe_allow_plaintext_remote": Key(parse_bool),
        "socket_group": Key(parse_group),
        # Refused by loading.load_config: tokens live in the database (opmasctl tokens create).
        "tokens_file": Key(parse_optional_path, paths=True),
    },
    "tls": {
        "cert": Key(parse_optional_path, paths=True),
        "key": Key(parse_optional_path, paths=True),
        "client_ca": Key(parse_optional_path, paths=True),
    },
    "agents": {
        "dirs": Key(parse_path_list, paths=True),
        "autostart": Key(parse_bool),
        "stop_timeout": Key(_NON_NEGATIVE),
        "restart_policy": Key(_restart_policy),
        "backoff_initial": Key(_NON_NEGATIVE),
        "backoff_max": Key(_NON_NEGATIVE),
        "stable_after": Key(_NON_NEGATIVE),
        "max_restarts": Key(parse_int(minimum=0)),
        "log_max_bytes": Key(parse_size),
        "log_backups": Key(parse_int(minimum=0)),
        "cgroups": Key(parse_choice("auto", "required", "off")),
        "process_scopes": Key(parse_choice("auto", "on", "off")),
        "runtime": Key(_runtime_kind),
        "systemd": Key(parse_choice("auto", "required", "off")),
        "systemd_bus": Key(parse_str),
        "systemd_journal": Key(parse_path, paths=True),
        "systemd_root": Key(parse_path, paths=True),
    },
}
