"""What every part of the benchmark shares: statistics, waiting, process tracking and cleanup.

Every process the benchmark starts carries BENCH_RUN=<run id> in its environment (daemons pass
their environment on to their agents), so the final sweep finds whatever is left, whatever
became of its parent. The benchmark is a child subreaper: agents orphaned by a daemon that died
are reparented to it and reaped here, not left as zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

MARKER = "BENCH_RUN"  # not OPMAS_*: opmasd keeps those variables from its agents
RUN_ID = uuid.uuid4().hex[:12]
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEER_VENV = BENCH_DIR / ".venv"

_DAEMONS: list[subprocess.Popen[bytes]] = []
_TMP_DIRS: list[Path] = []


class BenchError(Exception):
    """A scenario could not be measured (a system misbehaved, a wait timed out)."""


# -- statistics -------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile over the raw samples (p99 of 1000 samples is the 990th)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(0, math.ceil(q / 100.0 * len(ordered)) - 1)
    return ordered[rank]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


# -- waiting ----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.01, what: str = "") -> T:
    """Call predicate until it returns something truthy; BenchError after timeout seconds.

    Exceptions count as "not yet" (a daemon whose socket is not up yet), the last one is
    reported on timeout."""
    deadline = time.perf_counter() + timeout
    last: Any = None
    while True:
        check_interrupted()
        try:
            last = predicate()
        except BenchError:
            raise  # the probe knows it is hopeless (the daemon exited)
        except Exception as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.perf_counter() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what or predicate}; last: {last!r}")
        if interval:
            time.sleep(interval)


# -- machine ----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "host": platform.node(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tmp(prefix: str) -> Path:
    """A short directory under /tmp (unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=f"ob{prefix}", dir="/tmp"))
    _TMP_DIRS.append(path)
    return path


def remove_tmp(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(ValueError):
        _TMP_DIRS.remove(path)


# -- processes --------------------------------------------------------------------------------


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a daemon the benchmark starts: ours less OPMAS_*, plus the marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPMAS_")}
    env.pop("NOTIFY_SOCKET", None)
    env[MARKER] = RUN_ID
    env.update(extra or {})
    return env


def spawn_daemon(argv: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session (a Ctrl-C in the terminal reaches only us; we clean up)."""
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _DAEMONS.append(popen)
    return popen


def end_daemon(popen: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """SIGTERM, wait (SIGKILL after timeout); returns the seconds it took to exit."""
    t0 = time.perf_counter()
    if popen.poll() is None:
        popen.send_signal(signal.SIGCONT)  # in case it was paused for another's measurement
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    with contextlib.suppress(ValueError):
        _DAEMONS.remove(popen)
    return time.perf_counter() - t0


def tree_pids(pid: int) -> list[int]:
    """The live descendants of pid (not pid itself)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ExitWatch:
    """Exact exit times of a set of processes (not our children) through pidfds and epoll.

    start() begins watching on a thread; times are time.perf_counter() values. A process that
    is already gone when watched counts as exited at start."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.exits: dict[int, float] = {}
        self._fds: dict[int, int] = {}
        self._already: list[int] = []
        self._epoll = select.epoll()
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._already.append(pid)
                continue
            self._fds[fd] = pid
            self._epoll.register(fd, select.EPOLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def count(self) -> int:
        return len(self._fds) + len(self._already)

    def start(self) -> None:
        now = time.perf_counter()
        for pid in self._already:
            self.exits[pid] = now
        self._thread.start()

    def _run(self) -> None:
        while self._fds and not self._stop.is_set():
            events = self._epoll.poll(0.05)
            now = time.perf_counter()
            for fd, _ in events:
                pid = self._fds.pop(fd)
                self.exits[pid] = now
                self._epoll.unregister(fd)
                os.close(fd)

    def wait(self, timeout: float) -> int:
        """Wait until all exited or timeout; returns how many were still alive (they are
        SIGKILLed). Closes the watch."""
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join()
        left = len(self._fds)
        for fd in self._fds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)  # leaked: must not weigh on what follows
            os.close(fd)
        if left:
            time.sleep(0.05)
            reap_orphans()  # the leaked ones were reparented to us
        self._fds.clear()
        self._epoll.close()
        return left


# -- cleanup ----------------------------------------------------------------------------------


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        print("warning: cannot become a child subreaper; orphans may linger as zombies", file=sys.stderr)


def reap_orphans() -> None:
    """Reap zombie children that are not one of our daemons' Popen objects."""
    ours = {p.pid for p in _DAEMONS}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.pid not in ours and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


def marked_processes() -> list[int]:
    """Live processes of this run (our marker in their environment), us excluded."""
    me = os.getpid()
    found = []
    needle = f"{MARKER}={RUN_ID}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and alive(int(name)):
                    found.append(int(name))
        except OSError:
            continue
    return found


def cleanup_all() -> list[int]:
    """Stop every daemon we started, kill whatever of this run is left, remove temp dirs.

    Returns the PIDs that had to be killed in the sweep (should be none)."""
    for popen in list(_DAEMONS):
        end_daemon(popen, timeout=15.0)
    left = marked_processes()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        time.sleep(0.1)
    reap_orphans()
    for path in list(_TMP_DIRS):
        remove_tmp(path)
    return left


def raise_fd_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


INTERRUPTED = threading.Event()


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal asked us to stop. Library code (gRPC's blocking
    calls) can swallow the exception a signal handler raises, so the loops also ask."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt("interrupted")


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP end the run through the finally blocks (cleanup)."""

    def handler(signum: int, frame: Any) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)
