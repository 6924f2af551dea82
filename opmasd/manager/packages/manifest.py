"""Reads an agent package's manifest (agent.yaml) into an AgentSpec.

A manifest error is reported as ManifestError naming the file and the key; it never stops
discovery of the other packages.

    name: sysmon                  # required
    id: sysmon                    # optional; default: derived from name
    type: monitor
    version: 1.0.0
    description: Host load and memory reporter
    entrypoint: {module: sysmon}  # or a command: "bin/agent --flag" or [bin/agent, --flag]
    working_directory: .          # relative to the package folder (the default)
    environment: {LEVEL: info}
    restart_policy: on-failure    # never | on-failure | always
    stop_timeout: 10s
    heartbeat_interval: 30s
    start_seconds: 1s             # up this long (or its first heartbeat) = started; 0: at once
    resources: {memory_max: 256M, cpu_quota: 50, tasks_max: 64, open_files_max: 1024}
    runtime: process              # process | systemd
    user: opmas-probe             # who it runs as (name or uid; opmasd must be root); group: too
    capabilities: [CAP_NET_RAW]   # all it keeps (manifest_privileges); sandbox: {...} too
    autostart: true
    restart_on_inactive: false
    labels: {env: prod, role: probe}  # for selectors: opmasctl agents stop -l role=probe
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opmas.units import parse_duration, parse_percent, parse_size, shown
from opmasd.core.errors import InvalidArgument
from opmasd.core.ids import agent_id_from_name, check_agent_id
from opmasd.core.model import AgentSpec, ResourceLimits, RestartPolicy, RuntimeKind
from opmasd.core.yamlfile import load_yaml
from opmasd.manager.packages.manifest_privileges import capabilities_from, sandbox_from
from opmasd.manager.validation import spec_violations

MANIFEST_NAME = "agent.yaml"
KNOWN_KEYS = {
    "id",
    "name",
    "type",
    "version",
    "description",
    "entrypoint",
    "working_directory",
    "environment",
    "restart_policy",
    "stop_timeout",
    "heartbeat_interval",
    "start_seconds",
    "resources",
    "runtime",
    "autostart",
    "restart_on_inactive",
    "labels",
    "user",
    "group",
    "capabilities",
    "sandbox",
}
MAX_MANIFEST_BYTES = 1024 * 1024
_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}")
RESOURCE_KEYS = {"memory_max", "cpu_quota", "tasks_max", "open_files_max"}
# Where the agent SDK lives in a checkout and in an install, for module entrypoints.
SDK_DIRS = (Path(__file__).resolve().parents[3] / "agents", Path("/usr/lib/opmas"))


class ManifestError(Exception):
    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _key_names(keys: list[str]) -> str:
    """Unknown keys as an error may show them: names only (a key that is not a plain name, such
    as a line of some other file, is counted, not shown), a few, each short."""
    names = [k for k in keys if _KEY_NAME.fullmatch(k)]
    shown = ", ".join(names[:5])
    hidden = len(keys) - len(names[:5])
    if hidden:
        shown = f"{shown} and {hidden} more" if shown else f"{hidden} that are not key names"
    return shown


@dataclass(frozen=True)
class Manifest:
    path: Path
    agent_id: str
    spec: AgentSpec


def manifest_file(path: Path) -> Path:
    """The agent.yaml of a package folder, or path itself when it names a file."""
    try:
        return path / MANIFEST_NAME if path.is_dir() else path
    except OSError as exc:  # a name too long, a loop of links, ...
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path
        raise ManifestError(path, "cannot read: the path holds a NUL character") from None


def read_manifest_text(path: Path) -> str:
    """The file's text, if it is a regular file of at most MAX_MANIFEST_BYTES, read in one go.

    Opened non-blocking and checked before reading: a FIFO would block the reader until a
    writer comes, a device (/dev/zero) would be read for ever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path
        raise ManifestError(path, "cannot read: the path holds a NUL character") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError(path, "is not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(path, f"is {info.st_size} bytes; a manifest has at most {MAX_MANIFEST_BYTES}")
        data = os.read(fd, MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:  # it grew while we looked
            raise ManifestError(path, f"is over {MAX_MANIFEST_BYTES} bytes")
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"is not UTF-8 text (byte {exc.start})") from None


def load_manifest(path: Path, defaults: AgentSpec | None = None) -> Manifest:
    """Parse and validate one manifest; raises ManifestError naming what is wrong.

    Errors name the problem, never the file's content beyond a key's name: the path may be
    any file the daemon can read (an operator's typo, or a caller's probe).
    """
    path = manifest_file(path)
    try:
        path = path.resolve()
    except (OSError, ValueError) as exc:
        raise ManifestError(path, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    text = read_manifest_text(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        # The parser's problem only ("mapping values are not allowed here"), never str(exc),
        # which quotes the offending line.
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ManifestError(path, f"{where}invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ManifestError(path, "must be a mapping of keys (name, entrypoint, ...)")
    unknown = sorted(str(k) for k in data if k not in KNOWN_KEYS)
    if unknown:
        raise ManifestError(path, f"unknown key(s): {_key_names(unknown)}")
    try:
        spec = _spec_from(data, path.parent, defaults)
    except (ValueError, TypeError) as exc:
        raise ManifestError(path, str(exc)) from exc
    violations = spec_violations(spec, prefix="")
    if violations:
        raise ManifestError(path, "; ".join(f"{v.field}: {v.description}" for v in violations))
    agent_id = data.get("id") or ""
    if not isinstance(agent_id, str):
        raise ManifestError(path, "id: must be a string")
    if not agent_id:
        agent_id = agent_id_from_name(spec.name)
    try:
        check_agent_id(agent_id, "id")
    except InvalidArgument as exc:
        raise ManifestError(path, exc.message) from exc
    return Manifest(path=path, agent_id=agent_id, spec=spec)


def _text(data: dict[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"{key}: must be a string, got {type(value).__name__}")
    return str(value)


_non_negative_duration = parse_duration(positive=False)


def _seconds(data: dict[str, Any], key: str, default: float) -> float:
    if data.get(key) is None:
        return default
    try:
        return _non_negative_duration(data[key])
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false, got {shown(value)}")
    return value


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    """labels: a mapping of key: "value", strings only, as Kubernetes takes them: YAML reads
    0x1F as 31 and yes as true, which a label must not silently become (their grammar is
    checked with the rest of the spec)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValueError(f"labels: must be a mapping of key: value, got {shown(value)}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"labels: the key {shown(key)} is not a string; quote it")
        if not isinstance(item, str):
            raise ValueError(f"labels: the value of {shown(key)} is {shown(item)}, not a string; quote it")
    return tuple(sorted(value.items()))


def _entrypoint(value: Any, package_dir: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """The argv of an entrypoint, and environment it needs (PYTHONPATH for modules)."""
    if isinstance(value, dict):
        if set(value) != {"module"} or not isinstance(value["module"], str) or not value["module"]:
            raise ValueError("entrypoint: a mapping must be {module: python.module.name}")
        paths = [str(package_dir), *(str(d) for d in SDK_DIRS if d.is_dir())]
        return (sys.executable, "-m", value["module"]), {"PYTHONPATH": ":".join(paths)}
    if isinstance(value, str) and value.strip():
        try:
            return tuple(shlex.split(value)), {}
        except ValueError as exc:
            raise ValueError(f"entrypoint: {exc}") from None
    if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value), {}
    raise ValueError("entrypoint: required; a command string, a list of arguments, or {module: name}")


def _spec_from(data: dict[str, Any], package_dir: Path, defaults: AgentSpec | None) -> AgentSpec:
    name = _text(data, "name")
    if not name.strip():
        raise ValueError("name: required")
    command, extra_env = _entrypoint(data.get("entrypoint"), package_dir)
    workdir_text = _text(data, "working_directory", ".")
    workdir = (package_dir / workdir_text).resolve()

    env_raw = data.get("environment") or {}
    if not isinstance(env_raw, dict):
        raise ValueError("environment: must be a mapping of NAME: value")
    if any(isinstance(v, list | dict) for v in env_raw.values()):
        raise ValueError("environment: values must be strings, numbers or booleans")
    environment = {str(k): "" if v is None else str(v) for k, v in env_raw.items()}
    for key, value in extra_env.items():
        environment[key] = f"{environment[key]}:{value}" if key in environment else value

    policy_text = _text(data, "restart_policy", defaults.restart_policy.value if defaults else "on-failure")
    try:
        policy = RestartPolicy(policy_text)
    except ValueError:
        raise ValueError(
            f"restart_policy: {policy_text[:32]!r} is not one of never, on-failure, always"
        ) from None
    runtime_text = _text(data, "runtime", defaults.runtime.value if defaults else "process")
    try:
        runtime = RuntimeKind(runtime_text)
    except ValueError:
        raise ValueError(f"runtime: {runtime_text[:32]!r} is not one of process, systemd") from None

    res_raw = data.get("resources") or {}
    if not isinstance(res_raw, dict):
        raise ValueError("resources: must be a mapping")
    unknown = sorted(str(k) for k in res_raw if k not in RESOURCE_KEYS)
    if unknown:
        raise ValueError(f"resources: unknown key(s): {', '.join(unknown)}")
    try:
        resources = ResourceLimits(
            memory_max_bytes=parse_size(res_raw["memory_max"]) if "memory_max" in res_raw else 0,
            cpu_quota_percent=parse_percent(res_raw.get("cpu_quota", 0)),
            tasks_max=int(res_raw.get("tasks_max", 0)),
            open_files_max=int(res_raw.get("open_files_max", 0)),
        )
    except ValueError as exc:
        raise ValueError(f"resources: {exc}") from None

    return AgentSpec(
        labels=_labels(data.get("labels")),
        name=name,
        command=command,
        type=_text(data, "type", "generic"),
        version=_text(data, "version", "0.0.0"),
        description=_text(data, "description"),
        working_directory=str(workdir),
        environment=tuple(sorted(environment.items())),
        restart_policy=policy,
        stop_timeout=_seconds(data, "stop_timeout", defaults.stop_timeout if defaults else 10.0),
        heartbeat_interval=_seconds(data, "heartbeat_interval", 0.0),
        start_seconds=_seconds(data, "start_seconds", 1.0),
        resources=resources,
        runtime=runtime,
        autostart=_flag(data, "autostart"),
        restart_on_inactive=_flag(data, "restart_on_inactive"),
        user=_text(data, "user"),
        group=_text(data, "group"),
        capabilities=capabilities_from(data.get("capabilities")),
        sandbox=sandbox_from(data.get("sandbox")),
    )
