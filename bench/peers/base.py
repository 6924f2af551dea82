"""The interface every system under test implements, and the parts they share.

A driver is one installation of a supervisor in its own temp directory. `prepare(fleet)`
configures it (a config file, or agents registered in opmasd's store) so that the fleet starts
by itself when the daemon starts; `boot()` starts the daemon and returns the seconds from its
exec to the moment its API reports every autostart agent running. `start(fleet)` is both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from common import (
    BenchError,
    ExitWatch,
    check_interrupted,
    end_daemon,
    make_tmp,
    reap_orphans,
    remove_tmp,
    tree_pids,
    wait_until,
)

SLEEP = ["/bin/sleep", "100000"]
AGENT_PROGRAMS = {"sleep", "sh"}
# An agent with a child in its process group: the stop scenario must see both go.
SLEEP_WITH_CHILD = ["/bin/sh", "-c", "/bin/sleep 100000 & exec /bin/sleep 100000"]


@dataclass
class Fleet:
    n: int
    command: list[str] = field(default_factory=lambda: list(SLEEP))
    stop_timeout: float = 10.0
    autostart: bool = True
    # Registered but never started by themselves: (name, stop timeout). For the stall check.
    extra: list[tuple[str, float]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [f"a{i:04d}" for i in range(self.n)]


@dataclass
class StopResult:
    api_seconds: float  # until the stop call(s) returned
    gone_seconds: float  # until the last process of every agent (children included) had exited
    per_process: list[float]  # each process: seconds from the stop request to its exit
    processes: int
    left: int  # still alive when the wait gave up


class Driver(ABC):
    name: str = "?"
    settings: str = ""  # how this system is configured, for the report

    def __init__(self) -> None:
        self.root: Path = make_tmp(self.name[:4])
        self.fleet: Fleet | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.log = self.root / "daemon.log"

    # -- lifecycle ------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self, fleet: Fleet) -> None:
        """Configure the fleet so that it starts with the daemon. No daemon runs afterwards."""

    @abstractmethod
    def boot(self) -> float:
        """Start the daemon; seconds from its exec until every autostart agent is running."""

    def start(self, fleet: Fleet) -> float:
        self.prepare(fleet)
        return self.boot()

    def stop(self) -> float:
        """Shut the daemon down (its agents with it); seconds it took."""
        if self.popen is None:
            return 0.0
        popen, self.popen = self.popen, None
        seconds = end_daemon(popen, timeout=120.0)
        reap_orphans()  # agents the daemon left behind came to us (we are a subreaper)
        return seconds

    def close(self) -> None:
        self.stop()
        remove_tmp(self.root)

    @property
    def daemon_pid(self) -> int:
        if self.popen is None or self.popen.poll() is not None:
            raise BenchError(f"{self.name} is not running; its log:\n{self.log_tail()}")
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_all_running(self, count: int, t0: float, timeout: float) -> float:
        def done() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            return self.running_count() >= count

        wait_until(done, timeout, interval=0.01, what=f"{self.name}: {count} agents running")
        return time.perf_counter() - t0

    # -- the API ----------------------------------------------------------------------------------

    @abstractmethod
    def status(self, name: str) -> str:
        """One status call for one agent; its state as the system names it."""

    @abstractmethod
    def list(self) -> int:
        """One call listing every agent; how many were listed."""

    @abstractmethod
    def running_count(self) -> int:
        """How many agents the API reports running (one listing call)."""

    @abstractmethod
    def pid(self, name: str) -> int | None:
        """The agent's PID when the API reports it running, else None."""

    @abstractmethod
    def request_stop_all(self) -> None:
        """Ask the system to stop every agent; returns when its API says they are stopped."""

    @abstractmethod
    def start_stop(self, name: str) -> float:
        """Start the agent and stop it at once (as soon as the API allows): seconds the stop took."""

    # -- measurements built on the API -------------------------------------------------------------

    def kill_and_wait_restart(self, name: str, timeout: float = 30.0) -> float:
        """kill -9 the agent; seconds until the API reports a new PID running."""
        old = wait_until(lambda: self.pid(name), 10.0, what=f"{name} running before the kill")
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        deadline = t0 + timeout
        while True:
            check_interrupted()
            new = self.pid(name)
            now = time.perf_counter()
            if new is not None and new != old:
                return now - t0
            if now > deadline:
                raise BenchError(f"{self.name}: {name} not restarted within {timeout:g}s")
            time.sleep(0.0002)

    def agent_pids(self) -> list[int]:
        """Every process of every agent (the daemon's descendants that run an agent's programs;
        not helpers such as opmasd's embedded nats-server)."""
        found = []
        for pid in tree_pids(self.daemon_pid):
            try:
                if psutil.Process(pid).name() in AGENT_PROGRAMS:
                    found.append(pid)
            except psutil.NoSuchProcess:
                continue
        return found

    def helper_pids(self) -> list[int]:
        agents = set(self.agent_pids())
        return [pid for pid in tree_pids(self.daemon_pid) if pid not in agents]

    def stop_all(self, linger: float) -> StopResult:
        """Stop every agent through the API; every process of the tree is watched by pidfd.
        Processes still alive `linger` seconds after the API said all were stopped are left."""
        pids = self.agent_pids()
        watch = ExitWatch(pids)
        watch.start()
        t0 = time.perf_counter()
        self.request_stop_all()
        api = time.perf_counter() - t0
        left = watch.wait(linger)
        per_process = [t - t0 for t in watch.exits.values()]
        gone = max(per_process) if per_process else 0.0
        return StopResult(api, gone, per_process, len(pids), left)

    def footprint(self) -> tuple[int, float, int, float]:
        """(RSS bytes, CPU seconds used so far) of the daemon process itself, then the same
        summed over its helper processes (opmasd's embedded nats-server)."""
        proc = psutil.Process(self.daemon_pid)
        times = proc.cpu_times()
        helper_rss, helper_cpu = 0, 0.0
        for pid in self.helper_pids():
            try:
                helper = psutil.Process(pid)
                helper_rss += helper.memory_info().rss
                helper_cpu += sum(helper.cpu_times()[:2])
            except psutil.NoSuchProcess:
                continue
        return proc.memory_info().rss, times.user + times.system, helper_rss, helper_cpu
