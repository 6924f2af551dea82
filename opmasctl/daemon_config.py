"""Where the local opmasd listens according to its configuration: grpc.socket, grpc.viewer_socket
and grpc.address.

The file is the daemon's own ($OPMAS_CONFIG, else /etc/opmas/opmasd.yaml when it exists), read
with the daemon's environment overrides of those keys (OPMAS_GRPC_SOCKET, OPMAS_GRPC_ADDRESS,
OPMAS_SERVICE_RUNTIME_DIR, OPMAS_TLS_CERT) and its rules for them (opmasd/config): a relative path
is relative to the file, `grpc.socket: none` and `grpc.address: ""` turn a listener off, a socket
left unnamed is `<service.runtime_dir>/opmasd.sock`, and with `tls.cert` set the TCP address
(the default one included) speaks TLS, so opmasctl dials it over TLS. Only these keys are read;
the daemon judges the rest.
A file that cannot be used is a problem to report, never fatal: opmasctl then looks elsewhere.

Nor is a file that another user (not root) owns and that group or others may write used: whoever
may change it could point opmasctl at a daemon of their own, which would answer with what it
likes. (A token never goes to a place read here: connection.withheld.)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opmas.local import DEFAULT_TCP_ADDRESS, SOCKET_NAME
from opmasctl.endpoints import Endpoint, check_host_port, tcp_endpoint, unix_endpoint

DEFAULT_CONFIG_PATH = Path("/etc/opmas/opmasd.yaml")
# The daemon's configuration is a few KiB; anything near this is not one.
MAX_CONFIG_BYTES = 1 << 20
# Listening on every address means: reachable on loopback.
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}


@dataclass(frozen=True)
class Listener:
    """A place opmasd may listen (named by its configuration, --server, or a default), and
    what named it, for messages."""

    endpoint: Endpoint
    origin: str


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    reason: str
    # Worth a warning on every run (a broken file, an $OPMAS_CONFIG that is not there), rather
    # than only a line of the report when no daemon answers (a file this user may not read).
    loud: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class DaemonConfig:
    listeners: list[Listener] = field(default_factory=list)
    problem: ConfigProblem | None = None


class _Unusable(Exception):
    def __init__(self, reason: str, *, loud: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.loud = loud


def config_file(env: Mapping[str, str], default: Path = DEFAULT_CONFIG_PATH) -> tuple[Path, bool] | None:
    """The daemon's configuration file and whether it was named ($OPMAS_CONFIG), or None."""
    if env.get("OPMAS_CONFIG"):
        return Path(env["OPMAS_CONFIG"]).expanduser(), True
    # os.path.exists: a folder this user may not search means "not there", not an error.
    return (default, False) if os.path.exists(default) else None


def read_daemon_config(
    env: Mapping[str, str], default: Path = DEFAULT_CONFIG_PATH, euid: int | None = None
) -> DaemonConfig:
    """The gRPC listeners the configuration (file and environment) names, in the daemon's order:
    the socket, then the TCP address. `euid`: this user (default: the effective uid), who may
    own a file others may write."""
    found = config_file(env, default)
    values: dict[str, Any] = {}
    problem: ConfigProblem | None = None
    where = "the environment"
    base = Path.cwd()
    if found is not None:
        path, named = found
        where = str(path)
        base = Path(os.path.abspath(path)).parent
        try:
            values = _read(path, os.geteuid() if euid is None else euid)
        except _Unusable as err:
            problem = ConfigProblem(where, err.reason, loud=named or err.loud)
    settings = _Settings(values, env, where, base)
    listeners: list[Listener] = []
    for read in (settings.socket, settings.viewer_socket, settings.address):
        try:
            listener = read()
        except _Unusable as err:
            problem = problem or ConfigProblem(where, err.reason, loud=True)
            continue
        if listener is not None:
            listeners.append(listener)
    return DaemonConfig(listeners, problem)


def _read(path: Path, euid: int) -> dict[str, Any]:
    try:
        # O_NONBLOCK: a FIFO in its place must not hang opmasctl; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Unusable("no such file") from None
    except OSError as err:
        raise _Unusable(f"cannot read it: {(err.strerror or str(err)).lower()}", loud=False) from None
    # Checked before fdopen, which refuses a directory with an error of its own.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _Unusable("not a regular file")
    untrusted = _untrusted(info, euid)
    if untrusted is not None:
        os.close(fd)
        raise _Unusable(untrusted)
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise _Unusable(f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a configuration")
    try:
        # Only three scalars are read below; aliases cannot make that walk large.
        document = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Unusable("not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise _Unusable(f"invalid YAML: {where}{getattr(err, 'problem', None) or err}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise _Unusable("not a mapping of sections")
    return document


def _untrusted(info: os.stat_result, euid: int) -> str | None:
    """Why a file is not to be believed: another user's (not root's) that group or others may
    write. None: root's or this user's (0644 and 0640 are the usual), or only its owner writes it."""
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o022 or info.st_uid in (0, euid):
        return None
    writers = {0o020: "its group", 0o002: "all users", 0o022: "its group and all users"}[mode & 0o022]
    return (
        f"owned by uid {info.st_uid} (neither root nor you, uid {euid}) and writable by {writers} "
        f"(mode {mode:04o}): whoever may change it could point opmasctl at a daemon of their own"
    )


class _Settings:
    """The few settings read, environment first (as the daemon does), then the file."""

    def __init__(self, values: dict[str, Any], env: Mapping[str, str], where: str, base: Path) -> None:
        self._values = values
        self._env = env
        self._where = where
        self._base = base

    def _get(self, section: str, key: str) -> tuple[str, str, Path] | None:
        """(value, where it came from, base for a relative path), or None when not given."""
        variable = f"OPMAS_{section.upper()}_{key.upper()}"
        if variable in self._env:
            return self._env[variable], f"${variable}", Path.cwd()
        body = self._values.get(section)
        if body is None:
            return None
        if not isinstance(body, dict):
            raise _Unusable(f"{section}: not a mapping of keys")
        value = body.get(key)
        if value is None:
            return None  # written with no value: the default, as for the daemon
        if not isinstance(value, str):
            raise _Unusable(f"{section}.{key}: not a string")
        return value, f"{section}.{key} in {self._where}", self._base

    def _path(self, text: str, base: Path) -> str:
        path = Path(text).expanduser()
        return os.path.abspath(path if path.is_absolute() else base / path)

    def socket(self) -> Listener | None:
        given = self._get("grpc", "socket")
        if given is not None and given[0].strip():
            text, origin, base = given
            if text.strip().lower() == "none":
                return None
            return Listener(unix_endpoint(self._path(text.strip(), base)), origin)
        runtime = self._get("service", "runtime_dir")
        if runtime is None or not runtime[0].strip():
            return None  # the daemon's default socket, which the caller tries anyway
        text, origin, base = runtime
        return Listener(unix_endpoint(os.path.join(self._path(text.strip(), base), SOCKET_NAME)), origin)

    def viewer_socket(self) -> Listener | None:
        """The viewers' socket (grpc.viewer_socket): where a user outside the sockets' group
        still reads (tried after the admin socket, which refuses such a user)."""
        given = self._get("grpc", "viewer_socket")
        if given is None or given[0].strip().lower() in ("", "none"):
            return None
        text, origin, base = given
        return Listener(unix_endpoint(self._path(text.strip(), base)), origin)

    def address(self) -> Listener | None:
        given = self._get("grpc", "address")
        tls = self._get("tls", "cert")
        tls_origin = tls[1] if tls is not None and tls[0].strip() else None
        if given is None and tls_origin is None:
            return None  # the daemon's default address, which the caller tries anyway
        text, origin, _ = given or (DEFAULT_TCP_ADDRESS, tls_origin or "", Path())
        text = text.strip()
        if not text:
            return None
        host, sep, port = text.rpartition(":")
        if not sep:
            raise _Unusable(f"{origin}: not host:port: {text!r}")
        dial = f"{_ANY_HOST.get(host, host)}:{port}"
        try:
            check_host_port(dial)
        except ValueError as err:
            raise _Unusable(f"{origin}: {err}") from None
        if tls_origin is not None:  # TLS, with the CA opmasctl is given or the system's
            return Listener(Endpoint(dial, f"https://{dial}", is_unix=False, secure=True), origin)
        return Listener(tcp_endpoint(dial), origin)
