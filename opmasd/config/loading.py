"""Reading a configuration: defaults, then the YAML file, then OPMAS_<SECTION>_<KEY> variables.

Everything is checked when loaded, so a bad value stops the daemon at start with the file, the
key and the reason, instead of surfacing later as an odd failure deep in some subsystem.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml

from opmas.local import SOCKET_NAME
from opmas.tlsfiles import ServerFiles, TlsFileError, read_server_files
from opmasd.config.config_file import ConfigFileError, read_config_text, secret_keys_in, world_readable_secret
from opmasd.config.nats_agents import check_agent_subjects
from opmasd.config.nats_login import check_nats_login
from opmasd.config.parsers import split_address
from opmasd.config.paths import default_agent_dirs, default_log_dir, default_paths
from opmasd.config.schema import (
    SCHEMA,
    AgentsConfig,
    AuthConfig,
    Config,
    DatabaseConfig,
    GrpcConfig,
    NatsConfig,
    RestConfig,
    ServiceConfig,
    TlsConfig,
)
from opmasd.core.model import RuntimeKind
from opmasd.core.yamlfile import load_yaml

DEFAULT_CONFIG_PATH = Path("/etc/opmas/opmasd.yaml")
# Keys whose values are secrets: a value refused is never echoed back.
SECRET_KEYS = frozenset({"password", "token"})


class ConfigError(Exception):
    """A configuration problem: `source` is the file or the environment variable's origin."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_file(path: Path) -> dict[str, dict[str, object]]:
    name = str(path)
    try:
        text, mode = read_config_text(path)
    except ConfigFileError as exc:
        raise ConfigError(name, None, str(exc)) from None
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
        if section not in SCHEMA:
            hint = _suggest(str(section), list(SCHEMA))
            raise ConfigError(name, str(section), f"unknown section{hint}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(name, section, f"must be a mapping of keys, got {type(body).__name__}")
        for key in body:
            if key not in SCHEMA[section]:
                hint = _suggest(str(key), list(SCHEMA[section]))
                raise ConfigError(name, f"{section}.{key}", f"unknown key{hint}")
        # A key written with no value (`url:`) means "the default", as if it were absent.
        sections[section] = {key: value for key, value in body.items() if value is not None}
    refused = world_readable_secret(mode, secret_keys_in(sections))
    if refused is not None:
        raise ConfigError(name, None, refused)
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
        section = next((s for s in SCHEMA if rest.startswith(s.upper() + "_")), None)
        if section is None:
            continue
        key = rest.removeprefix(section.upper() + "_").lower()
        if key not in SCHEMA[section]:
            known = [f"OPMAS_{section.upper()}_{k.upper()}" for k in SCHEMA[section]]
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
    for section, keys in SCHEMA.items():
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
                # A secret's bad value is not shown (it may be the secret, mistyped).
                reason = "not a valid value (not shown: it is a secret)" if key in SECRET_KEYS else str(exc)
                raise ConfigError(source, label, reason) from None
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
    service.setdefault("log_dir", default_log_dir(env, euid, service["state_dir"]))

    database = values["database"]
    if not database.get("url"):
        database["url"] = f"sqlite:///{service['state_dir'] / 'opmas.db'}"

    grpc = values["grpc"]
    if grpc.get("socket", "") == "":
        grpc["socket"] = service["runtime_dir"] / SOCKET_NAME

    rest = values["rest"]
    rest_listens = rest.get("address", RestConfig.address) or rest.get("socket")
    grpc_listens = grpc["socket"] is not None or grpc.get("address", GrpcConfig.address)
    if rest.get("enabled", True) and rest_listens and not grpc_listens:
        # The REST gateway calls the gRPC service through one of its listeners.
        key = "socket" if ("grpc", "socket") in origins else "address"
        source, label = origins.get(("grpc", key), ("configuration", f"grpc.{key}"))
        raise ConfigError(
            source, label, "REST (rest.enabled) needs a gRPC listener: grpc.socket or grpc.address"
        )

    tls_files = _check_tls(values, origins)
    _check_auth(values, origins)
    _check_systemd(values, origins)

    def refuse_nats(key: str, why: str) -> NoReturn:
        source, label = origins.get(("nats", key), ("configuration", f"nats.{key}"))
        raise ConfigError(source, label, why)

    check_nats_login(values["nats"], refuse_nats)
    check_agent_subjects(values["nats"], refuse_nats)

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
        agents=AgentsConfig(**agents),
        auth=AuthConfig(**values["auth"]),
        tls=TlsConfig(**values["tls"], files=tls_files),
        source=path,
    )


# The setting that names each kind of TLS file.
_TLS_KEYS = {"cert": "cert", "key": "key", "ca": "client_ca"}


def _check_systemd(
    values: dict[str, dict[str, Any]], origins: dict[tuple[str, str], tuple[str, str]]
) -> None:
    """With the systemd runtime off, what only it reads would be ignored: refused."""
    agents = values["agents"]
    if agents.get("systemd") != "off":
        return
    for key in ("runtime", "systemd_bus", "systemd_root", "systemd_journal"):
        value = agents.get(key)
        if value and (key != "runtime" or value is RuntimeKind.SYSTEMD):
            source, label = origins[("agents", key)]
            what = "systemd" if key == "runtime" else "given"
            raise ConfigError(source, label, f"{what}, but agents.systemd is off: it would be ignored")


def _check_tls(
    values: dict[str, dict[str, Any]], origins: dict[tuple[str, str], tuple[str, str]]
) -> ServerFiles | None:
    """The tls section's files, read and checked (cert and key that load and match, a client CA
    that holds certificates, a key that not every user may read); None without TLS."""
    tls = values["tls"]

    def refuse(key: str, why: str) -> NoReturn:
        source, label = origins.get(("tls", key), ("configuration", f"tls.{key}"))
        raise ConfigError(source, label, why)

    cert, key, client_ca = tls.get("cert"), tls.get("key"), tls.get("client_ca")
    if cert is None and key is None:
        if client_ca is not None:
            refuse("client_ca", "a client CA (mTLS) needs TLS: set tls.cert and tls.key too")
        return None
    if key is None:
        refuse("cert", "given without tls.key, the certificate's private key: set both, or neither")
    if cert is None:
        refuse("key", "given without tls.cert, the key's certificate: set both, or neither")
    rest_tcp = values["rest"].get("enabled", True) and values["rest"].get("address", RestConfig.address)
    if not values["grpc"].get("address", GrpcConfig.address) and not rest_tcp:
        refuse("cert", "no TCP listener to serve TLS on (grpc.address and rest.address are off)")
    try:
        return read_server_files(cert, key, client_ca)
    except TlsFileError as err:
        refuse(_TLS_KEYS[err.which], str(err))


def _check_auth(values: dict[str, dict[str, Any]], origins: dict[tuple[str, str], tuple[str, str]]) -> None:
    """Refuse what would leave the control plane open without saying so in a key named unsafe."""
    auth = values["auth"]

    def refuse(section: str, key: str, why: str) -> NoReturn:
        source, label = origins.get((section, key), ("configuration", f"{section}.{key}"))
        raise ConfigError(source, label, why)

    if "tokens_file" in auth:
        refuse(
            "auth", "tokens_file", "tokens are kept in the database: make them with `opmasctl tokens create`"
        )
    if auth.get("enabled") is False and not auth.get("unsafe_allow_unauthenticated"):
        refuse(
            "auth",
            "enabled",
            "with auth off, anyone who can connect to TCP gRPC, REST or NATS (every local user, on "
            "127.0.0.1) may register and run commands as this daemon's user; set "
            "auth.unsafe_allow_unauthenticated: true to accept that",
        )
    tls_on = values["tls"].get("cert") is not None
    if not auth.get("unsafe_allow_plaintext_remote") and not tls_on:
        for section, default in (("grpc", GrpcConfig.address), ("rest", RestConfig.address)):
            if section == "rest" and values["rest"].get("enabled") is False:
                continue
            address = values[section].get("address", default)
            if address and not is_loopback(split_address(address)[0]):
                refuse(
                    section,
                    "address",
                    f"{address} is not a loopback address, and TLS is not configured: tokens and "
                    "everything else would cross the network in clear; configure tls.cert and "
                    "tls.key (see the README's TLS section), or listen on 127.0.0.1 or [::1] "
                    "(reach it through an SSH tunnel), or set auth.unsafe_allow_plaintext_remote: "
                    "true to accept that",
                )
    group = auth.get("socket_group")
    if group and ("auth", "socket_group") in origins:
        try:
            grp.getgrnam(group)
        except KeyError:
            refuse("auth", "socket_group", f"there is no group {group!r} on this host")


def is_loopback(host: str) -> bool:
    """A host that only this machine can reach: localhost, 127.0.0.0/8 or ::1 (a name other than
    localhost may resolve anywhere, so it is not)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
