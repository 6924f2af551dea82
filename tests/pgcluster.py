"""A private PostgreSQL cluster per test, for fault tests of the daemon's store.

The machine's shared PostgreSQL (127.0.0.1:5432) must never be stopped or frozen, yet the store's
fault handling can only be tested against a server that dies, hangs or comes back. PrivateCluster
is a throw-away server of our own: started on a free port of 127.0.0.1 with its unix socket in its
data directory, it can be stopped, frozen (SIGSTOP on the postmaster and every process under it),
thawed, SIGKILLed and started again, and it has a database `opmas` at `url`.

Speed: initdb takes seconds, so a template cluster (initdb'd, configured, with `opmas` created,
cleanly shut down) is built once per PostgreSQL major version and option set and cached in
/var/cache/opmas-tests; each PrivateCluster is a `cp -a` of it under /var/tmp/opmas-tests. Both
are outside the git clone (nothing to ignore or commit) and outside /tmp (tests that run systemd
units in namespaces make /tmp private). The template is built in a temporary directory and
renamed into place under an exclusive flock, so concurrent pytest processes never see half of one;
a template that fails validation (no marker, wrong version, pg_control not "shut down") is rebuilt.

Requirements: PostgreSQL's server binaries under /usr/lib/postgresql/<major>/bin (the newest major
is used), root (the server runs as user postgres, through runuser), and the user postgres. When one
is missing, PgUnavailable says which, and the fixture fails the test with that message: the
project's rule is that a test needing something absent fails clearly instead of skipping.

Cleanup: close() thaws, stops and removes a cluster; every cluster not closed yet is closed at
interpreter exit (atexit), and directories left by a process that died without running atexit
(SIGKILL, os._exit) are swept, their postmasters killed, when the next process creates a cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

PG_ROOT = Path("/usr/lib/postgresql")
CACHE_ROOT = Path("/var/cache/opmas-tests")
WORK_ROOT = Path("/var/tmp/opmas-tests")
PG_USER = "postgres"
DATABASE = "opmas"
NEEDED_BINARIES = ("initdb", "pg_ctl", "postgres", "createdb", "pg_controldata", "pg_isready")

# Bump when the template's layout or build changes in a way the hash below does not see.
TEMPLATE_FORMAT = 1
INITDB_OPTIONS = (
    "--auth=trust",
    "--username=postgres",
    "--encoding=UTF8",
    "--locale=C",
    # 1 MiB WAL segments instead of 16: the fresh pg_wal is 1 MiB, so each copy of the template
    # is about 40% smaller (and faster to make).
    "--wal-segsize=1",
    "--no-instructions",
)
SETTINGS = {
    "max_connections": "50",
    "shared_buffers": "16MB",
    # fsync off: fsync only protects against losing the OS page cache (a kernel crash or power
    # loss), which no test simulates. A SIGKILLed server loses nothing acknowledged with fsync
    # off, because a commit still write()s its WAL to the kernel before it returns -- that is
    # synchronous_commit, which stays on (off would lose acknowledged commits on kill -9 and
    # make the kill tests lie). Without the fsyncs, schema creation and checkpoints are much
    # faster, and the tests do not compete for the shared disk with the shared server.
    "fsync": "off",
    "synchronous_commit": "on",
    "huge_pages": "off",
    "min_wal_size": "4MB",
    "max_wal_size": "32MB",
    "timezone": "'UTC'",
    "log_line_prefix": "'%m [%p] '",
}
# Short enough that a broken start fails the test well inside pytest-timeout's 120 s.
START_TIMEOUT = 30
STOP_TIMEOUT = 30
# The environment of every PostgreSQL command: nothing of the test's own (PGHOST, PGPORT, PGDATA,
# PGUSER... would redirect createdb or pg_isready; E2E_SANDBOX would make the e2e teardown
# mistake our postmaster for a daemon's leftover).
PG_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}


class PgUnavailable(RuntimeError):
    """Something the private cluster needs is absent from this machine."""


class ClusterError(RuntimeError):
    """The private cluster did not do what was asked (the message has the tail of its log)."""


# -- what we need from the machine --------------------------------------------------------------


def find_bindir() -> Path:
    """The bin directory of the newest PostgreSQL major version installed the Debian way."""
    majors: list[int] = []
    if PG_ROOT.is_dir():
        majors = sorted(int(p.name) for p in PG_ROOT.iterdir() if p.name.isdigit())
    for major in reversed(majors):
        bindir = PG_ROOT / str(major) / "bin"
        if all(os.access(bindir / name, os.X_OK) for name in NEEDED_BINARIES):
            return bindir
    found = ", ".join(str(PG_ROOT / str(m) / "bin") for m in majors) or f"no {PG_ROOT}/<version>"
    raise PgUnavailable(
        f"PostgreSQL server binaries are missing: the private test cluster needs "
        f"{', '.join(NEEDED_BINARIES)} in {PG_ROOT}/<major>/bin (found: {found}). "
        "Install them with `apt-get install postgresql` (.ci/run does this)."
    )


def check_machine() -> tuple[Path, pwd.struct_passwd]:
    """The binaries and the postgres user, or PgUnavailable naming what is missing."""
    if os.geteuid() != 0:
        raise PgUnavailable(
            "the private PostgreSQL cluster needs root: it runs initdb and pg_ctl as user "
            f"{PG_USER} through runuser and removes their files. Run the tests as root (as CI does)."
        )
    bindir = find_bindir()
    try:
        user = pwd.getpwnam(PG_USER)
    except KeyError:
        raise PgUnavailable(
            f"the user {PG_USER!r} is missing; it comes with the postgresql package "
            "(`apt-get install postgresql`)."
        ) from None
    if shutil.which("runuser") is None:
        raise PgUnavailable("runuser is missing (util-linux): the cluster runs as user postgres through it.")
    return bindir, user


def _as_postgres(bindir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program as user postgres (initdb and pg_ctl refuse to run as root)."""
    return subprocess.run(
        ["runuser", "-u", PG_USER, "--", str(bindir / args[0]), *args[1:]],
        env=PG_ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _check(result: subprocess.CompletedProcess[str], what: str, log: Path | None = None) -> None:
    if result.returncode != 0:
        detail = f"{result.stdout}{result.stderr}".strip()
        if log is not None:
            detail += f"\n--- {log} ---\n{_tail(log)}"
        raise ClusterError(f"{what} failed (exit {result.returncode}):\n{detail}")


# -- processes, through /proc -------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _alive(pid: int) -> bool:
    """Running or stopped, not a zombie: here PID 1 does not reap, so a dead postmaster may stay
    a zombie for good, and a zombie answers kill(pid, 0) like a live process."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    """Reap pid if it is our child: it is when the test process is a child subreaper (the e2e
    tests are) and adopted the postmaster after pg_ctl, its parent, exited."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _descendants(pid: int) -> list[int]:
    """Every process under pid (children first, then theirs), from the PPIDs in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> bool:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            _reap(pid)
        if not any(_alive(pid) for pid in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _wait_stopped(pids: list[int], timeout: float = 5) -> None:
    """Until every process of pids is stopped ("T") or gone."""
    deadline = time.monotonic() + timeout
    while running := [p for p in pids if (_stat(p) or ("T",))[0] not in ("T", "Z", "X")]:
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {running} did not stop on SIGSTOP")
        time.sleep(0.002)


def _postmaster_of(data: Path) -> int | None:
    """The live postmaster of the data directory: the PID in its postmaster.pid, if that process
    is alive and is a postgres of that very directory. The check on the command line keeps a
    reused PID, and above all the shared server, out of reach of our signals."""
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if not _alive(pid) or str(data).encode() not in cmdline:
        return None
    return pid


def _drop_shared_memory(data: Path) -> None:
    """Remove the SysV segment a killed postmaster left behind, if nothing is attached to it.

    A restarted server reclaims it by itself, but a cluster closed after kill() would leak it.
    """
    try:
        line = (data / "postmaster.pid").read_text().splitlines()[6]
        key, shmid = (int(x) for x in line.split())
        table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except (OSError, ValueError, IndexError):
        return
    for row in table:
        cols = row.split()
        # key shmid perms size cpid lpid nattch ...
        if int(cols[0]) == key and int(cols[1]) == shmid and int(cols[6]) == 0:
            subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, check=False)


def _users_of(directory: Path) -> list[int]:
    """Processes naming directory (or a path under it) on their command line -- a postmaster,
    an initdb, a pg_ctl of ours -- and every process under those (backends name no path)."""
    prefix = str(directory).encode()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a == prefix or a.startswith(prefix + b"/") for a in args) and _alive(int(entry)):
                found.append(int(entry))
    for pid in list(found):
        found.extend(p for p in _descendants(pid) if p not in found)
    return found


def _stop_leftover(directory: Path) -> None:
    """Kill whatever still runs on a directory of ours that nobody owns any more (the whole tree,
    at once: SIGKILL also ends stopped, frozen processes), and free its shared memory."""
    procs = _users_of(directory)
    if procs:
        _signal(procs, signal.SIGKILL)
        _wait_gone(procs, 10)
    _drop_shared_memory(directory / "data")


# -- the template -------------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _major(bindir: Path) -> str:
    return bindir.parent.name


def template_path(bindir: Path) -> Path:
    """/var/cache/opmas-tests/pg-template-<major>-<hash of how it is built>."""
    recipe = json.dumps([TEMPLATE_FORMAT, INITDB_OPTIONS, SETTINGS, DATABASE], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return CACHE_ROOT / f"pg-template-{_major(bindir)}-{digest}"


def _template_ok(bindir: Path, path: Path) -> bool:
    """Complete (marker written last), of this major version, and cleanly shut down."""
    data = path / "data"
    try:
        marker = json.loads((path / "template.json").read_text())
        version = (data / "PG_VERSION").read_text().strip()
    except (OSError, ValueError):
        return False
    if marker.get("major") != _major(bindir) or version != _major(bindir):
        return False
    result = subprocess.run(
        [str(bindir / "pg_controldata"), "-D", str(data)], env=PG_ENV, capture_output=True, text=True
    )
    return result.returncode == 0 and "Database cluster state:               shut down\n" in result.stdout


def _build_template(bindir: Path, user: pwd.struct_passwd, final: Path) -> None:
    """initdb, configure and create `opmas` in a scratch directory, then rename it to final."""
    build = CACHE_ROOT / f".{final.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir(mode=0o755)
    os.chown(build, user.pw_uid, user.pw_gid)
    data = build / "data"
    log = build / "build.log"
    try:
        _check(_as_postgres(bindir, "initdb", "-D", str(data), *INITDB_OPTIONS), "initdb of the template")
        # Appended: the last occurrence of a setting in postgresql.conf wins. Writing into the
        # existing file keeps its owner, postgres.
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# opmas tests (tests/pgcluster.py)\n")
            conf.writelines(f"{name} = {value}\n" for name, value in SETTINGS.items())
        # Started once, on its unix socket only (no TCP port to find), to create the database;
        # the port number only names the socket file in the data directory.
        _check(
            _as_postgres(
                bindir, "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT),
                "-o", f"-p 5432 -k {data} -c listen_addresses=''", "start",
            ),
            "starting the template",
            log,
        )  # fmt: skip
        try:
            _check(
                _as_postgres(bindir, "createdb", "-h", str(data), "-p", "5432", "-U", PG_USER, DATABASE),
                f"createdb {DATABASE}",
                log,
            )
        finally:
            # A clean shutdown: the copies start without crash recovery.
            _check(
                _as_postgres(bindir, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"),
                "stopping the template",
                log,
            )
        (data / "postmaster.opts").unlink(missing_ok=True)
        (build / "template.json").write_text(
            json.dumps({"major": _major(bindir), "initdb": INITDB_OPTIONS, "settings": SETTINGS})
        )
        os.rename(build, final)
    except BaseException:
        _stop_leftover(build)
        shutil.rmtree(build, ignore_errors=True)
        raise


def ensure_template(bindir: Path, user: pwd.struct_passwd) -> Path:
    """The template's data directory, built first if absent or broken.

    Under an exclusive lock: one process builds while the others wait for it, then use its work.
    """
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    final = template_path(bindir)
    with _flock(CACHE_ROOT / f"{final.name}.lock", fcntl.LOCK_EX):
        if _template_ok(bindir, final):
            return final / "data"
        # Scratch builds of processes that died while building (they held this lock then).
        for stale in CACHE_ROOT.glob(f".{final.name}.build-*"):
            _stop_leftover(stale)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            # Broken: moved aside first, so a crash while removing it leaves no half template.
            trash = CACHE_ROOT / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        _build_template(bindir, user, final)
        return final / "data"


# -- clusters -----------------------------------------------------------------------------------

_LIVE: set[PrivateCluster] = set()
_swept = False


def _owner_token(pid: int) -> str:
    stat = _stat(pid)
    return f"{pid} {stat[2] if stat else 0}"


def sweep_stale_clusters() -> None:
    """Kill and remove clusters whose owning test process is gone without closing them.

    The owner is identified by PID and start time, so a reused PID does not keep a stale
    cluster alive, and a concurrent pytest's clusters are left alone.
    """
    if not WORK_ROOT.is_dir():
        return
    for root in WORK_ROOT.iterdir():
        try:
            pid_text, _, start = (root / "owner").read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            # Not ours, or its creator died between mkdtemp and writing the owner file: remove
            # only when old enough that no live creator can be about to write it.
            with contextlib.suppress(OSError):
                if root.is_dir() and time.time() - root.stat().st_mtime > 600:
                    _stop_leftover(root)
                    shutil.rmtree(root, ignore_errors=True)
            continue
        if _alive(pid) and _owner_token(pid) == f"{pid} {start.strip()}":
            continue
        _stop_leftover(root)
        shutil.rmtree(root, ignore_errors=True)


def _pick_port() -> int:
    """A free port below the kernel's ephemeral range.

    Ports from bind(0) come from the ephemeral range, where outgoing connections take their local
    ports: after a stop, one of them could sit on ours and the restart would fail to bind.
    Below the range, only another listener can take it, and we check that none does.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(20000, max(low, 20001))
        if _port_free(port):
            return port
    raise ClusterError("no free TCP port below the ephemeral range on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As postgres binds: SO_REUSEADDR, so a TIME_WAIT left by our own last run is no obstacle.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PrivateCluster:
    """A PostgreSQL server of our own, copied from the cached template on the first start().

    Its port is chosen at the first start and kept, so `url` stays valid across stop()/start()
    and kill()/start(); its data survive them too. Use it as a context manager or call close().
    """

    def __init__(self, name: str = "pg") -> None:
        self.bindir, self._user = check_machine()
        global _swept
        if not _swept:
            _swept = True
            sweep_stale_clusters()
        WORK_ROOT.mkdir(parents=True, exist_ok=True)
        os.chmod(WORK_ROOT, 0o755)  # postgres must traverse it, whatever the umask
        self.root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK_ROOT))
        (self.root / "owner").write_text(_owner_token(os.getpid()))
        # postgres writes its log here, beside (not in) the data directory that the copy makes.
        os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgresql.log"
        self._port: int | None = None
        self._frozen: list[int] = []
        self._closed = False
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"PrivateCluster({self.root}, port={self._port})"

    def __enter__(self) -> PrivateCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("the cluster has no port before its first start()")
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it is alive."""
        return _postmaster_of(self.data)

    def processes(self) -> list[int]:
        """The postmaster and every process under it (backends, checkpointer...), if running."""
        pid = self.pid
        return [] if pid is None else [pid, *_descendants(pid)]

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def is_running(self) -> bool:
        """The postmaster process is alive (answering or frozen)."""
        return self.pid is not None

    def is_up(self) -> bool:
        """The server answers connections on its TCP port now (a frozen one does not)."""
        if self._port is None or self._frozen or not self.is_running():
            return False
        result = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self._port), "-t", "2"],
            env=PG_ENV,
            check=False,
        )
        return result.returncode == 0

    def start(self) -> None:
        """Start the server; returns once it accepts connections (pg_ctl -w)."""
        if self._closed:
            raise ClusterError(f"{self!r} is closed")
        if self.is_running():
            raise ClusterError(f"{self!r} is already running")
        if not self.data.exists():
            template = ensure_template(self.bindir, self._user)
            with _flock(CACHE_ROOT / f"{template.parent.name}.lock", fcntl.LOCK_SH):
                # -a: postgres keeps owning the copy, with the data directory's mode 0700.
                result = subprocess.run(
                    ["cp", "-a", "--reflink=auto", str(template), str(self.data)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            _check(result, "copying the template")
        self._forget_dead_postmaster()
        if self._port is not None:
            if not _port_free(self._port):
                raise ClusterError(f"port {self._port} of {self!r} was taken by another listener meanwhile")
            self._pg_ctl_start(self._port)
            return
        # The first start: another process may take the port between our check and the bind.
        for attempt in range(5):
            port = _pick_port()
            try:
                self._pg_ctl_start(port)
            except ClusterError as exc:
                if "Address already in use" in str(exc) and attempt < 4:
                    self._forget_dead_postmaster()
                    continue
                raise
            self._port = port
            return

    def _pg_ctl_start(self, port: int) -> None:
        # listen_addresses and the socket directory on the command line, not in the template:
        # the port changes per cluster and the socket lives in the data directory, not in
        # /var/run/postgresql where the shared server's is.
        options = f"-p {port} -k {self.data} -c listen_addresses=127.0.0.1"
        result = _as_postgres(
            self.bindir, "pg_ctl", "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", str(START_TIMEOUT), "-o", options, "start",
            timeout=START_TIMEOUT + 30,
        )  # fmt: skip
        _check(result, f"starting {self!r} on port {port}", self.log)

    def _forget_dead_postmaster(self) -> None:
        """Remove the postmaster.pid of a killed server before a start.

        PostgreSQL would reuse the file itself, except when its PID is a zombie: PID 1 may reap
        late (this machine's does, lazily), kill(zombie, 0) succeeds, and postgres refuses to
        start beside "another postmaster".
        """
        if self.pid is not None:
            return
        # The socket's lock file holds the same PID and is refused the same way. The shared
        # memory is reclaimed by the new server all the same (found by the data directory's inode).
        for lockfile in [self.data / "postmaster.pid", *self.data.glob(".s.PGSQL.*.lock")]:
            lockfile.unlink(missing_ok=True)

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """pg_ctl stop -m mode ("smart", "fast" or "immediate"); a frozen server is thawed first.

        Nothing happens when it is not running.
        """
        pid = self.pid
        if pid is None:
            return
        self.thaw()
        result = _as_postgres(
            self.bindir, "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(STOP_TIMEOUT), "stop",
            timeout=STOP_TIMEOUT + 30,
        )  # fmt: skip
        _check(result, f"stopping {self!r} ({mode})", self.log)
        _wait_gone([pid], 5)

    def kill(self, postmaster_only: bool = False) -> None:
        """SIGKILL the postmaster and every process under it: the server dies at once, as in a
        crash, with no shutdown checkpoint (the next start runs crash recovery).

        postmaster_only: SIGKILL only the postmaster; its backends notice, end their sessions
        and exit by themselves (waited for here, thawed first if frozen).
        """
        pid = self.pid
        if pid is None:
            return
        procs = [pid, *_descendants(pid)]
        if postmaster_only:
            _signal([pid], signal.SIGKILL)
            # Stopped backends could not notice their postmaster's death.
            _signal(procs[1:], signal.SIGCONT)
        else:
            _signal(procs, signal.SIGKILL)
        self._frozen = []
        if not _wait_gone(procs, 10):
            left = [p for p in procs if _alive(p)]
            raise ClusterError(f"processes of {self!r} still alive 10 s after SIGKILL: {left}")

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every process under it: the server hangs, as a machine that
        stopped answering would. Connections are accepted by the kernel (backlog) and never
        answered; established sessions never get a reply."""
        pid = self.pid
        if pid is None:
            raise ClusterError(f"{self!r} is not running: nothing to freeze")
        # The postmaster first, so that it forks no new backend while we stop the others.
        os.kill(pid, signal.SIGSTOP)
        self._frozen = frozen = [pid]
        _wait_stopped([pid])
        # Until nothing new turns up: a child may have forked one (archive_command, COPY PROGRAM).
        while new := [p for p in _descendants(pid) if p not in frozen]:
            _signal(new, signal.SIGSTOP)
            frozen.extend(new)
            # kill() returns before the signal is acted upon; a process stops only when it next
            # runs. Wait, so that the caller's next step meets a server that is really frozen.
            _wait_stopped(new)

    def thaw(self) -> None:
        """SIGCONT what freeze() stopped: the children first, the postmaster last, so that it
        finds the processes it supervises running when it resumes."""
        frozen, self._frozen = self._frozen, []
        _signal(reversed(frozen), signal.SIGCONT)

    def close(self) -> None:
        """Stop the server (whatever its state: frozen, killed, running) and remove its files."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        self.thaw()
        try:
            if self.is_running():
                # Immediate: the data are thrown away, no need for a shutdown checkpoint.
                self.stop("immediate")
        except (ClusterError, subprocess.TimeoutExpired):
            pass
        finally:
            _stop_leftover(self.root)
            shutil.rmtree(self.root, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    """A test that crashed past its fixture's cleanup leaves no running postmaster behind."""
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.close()
