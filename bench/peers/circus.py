"""circus (from bench/.venv), driven over its ZeroMQ control socket (ipc://, a unix socket).

One [watcher:x] per agent: numprocesses=1, respawn=true, max_retry=-1, check_flapping=false
(a crash test must not trip flapping protection), stop_children=true (a stop reaches the
agent's children), graceful_timeout as the fleet's stop timeout, copy_env=true. circus notices
exits only when it checks its watchers, every check_delay: 1 s here (the ini default is 5 s).

The circus client (pyzmq, tornado) lives in bench/.venv; the same CPython builds both venvs,
so its site-packages are appended to our path for the client side.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import PEER_VENV, BenchError, bench_env, spawn_daemon, wait_until

from peers.base import Driver, Fleet


def _client_class() -> Any:
    site = PEER_VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not site.is_dir():
        raise BenchError(f"{site} is missing: bench/.venv must be built by the same Python as .venv")
    if str(site) not in sys.path:
        sys.path.append(str(site))
    from circus.client import CircusClient

    return CircusClient


CHECK_DELAY = 1.0


class CircusDriver(Driver):
    name = "circus"
    settings = (
        f"circus 0.19 from PyPI; [watcher:x] numprocesses=1 respawn=true max_retry=-1 "
        f"check_flapping=false stop_children=true copy_env=true; check_delay={CHECK_DELAY:g}s"
    )

    def __init__(self) -> None:
        super().__init__()
        self.endpoint = f"ipc://{self.root / 'ctl.sock'}"
        self.conf = self.root / "circus.ini"
        self._client: Any = None
        self.busy_retries = 0

    def prepare(self, fleet: Fleet) -> None:
        self.fleet = fleet
        r = self.root
        lines = [
            "[circus]",
            f"check_delay = {CHECK_DELAY:g}",
            f"endpoint = {self.endpoint}",
            f"pubsub_endpoint = ipc://{r / 'pub.sock'}",
            "statsd = false",
            "warmup_delay = 0",
        ]
        watchers = [(name, fleet.stop_timeout, fleet.autostart) for name in fleet.names()]
        watchers += [(name, timeout, False) for name, timeout in fleet.extra]
        import shlex

        for name, stop_timeout, autostart in watchers:
            lines += [
                f"[watcher:{name}]",
                f"cmd = {shlex.join(fleet.command)}",
                "numprocesses = 1",
                "respawn = true",
                "max_retry = -1",
                "check_flapping = false",
                "stop_children = true",
                "copy_env = true",
                f"graceful_timeout = {stop_timeout:g}",
                f"autostart = {'true' if autostart else 'false'}",
                "warmup_delay = 0",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client_class()(endpoint=self.endpoint, timeout=300)
        return self._client

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        """One command. circusd refuses commands while its periodic watcher check runs ("arbiter
        is already running ..."): a client must try again, and that time counts."""
        deadline = time.perf_counter() + 30.0
        while True:
            reply: dict[str, Any] = self.client.call({"command": command, "properties": dict(properties)})
            if reply.get("status") != "error":
                return reply
            if "already running" not in str(reply.get("reason")) or time.perf_counter() > deadline:
                raise BenchError(f"circus {command} {properties}: {reply}")
            self.busy_retries += 1
            time.sleep(0.001)

    def boot(self) -> float:
        assert self.fleet is not None
        t0 = time.perf_counter()
        self.popen = spawn_daemon(
            [
                str(PEER_VENV / "bin" / "circusd"),
                "--log-level",
                "warning",
                "--log-output",
                str(self.root / "circusd.log"),
                str(self.conf),
            ],
            bench_env(),
            self.log,
        )
        self._client = None
        wait_until(self._answers, 60.0, interval=0.005, what="circusd to answer on its socket")
        return self._wait_all_running(self.fleet.n if self.fleet.autostart else 0, t0, 300.0)

    def _answers(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise BenchError(f"circusd exited with {self.popen.returncode}:\n{self.log_tail()}")
        if not (self.root / "ctl.sock").exists():
            return False
        # A short timeout while it starts: a call sent too early is never answered.
        client = _client_class()(endpoint=self.endpoint, timeout=0.5)
        try:
            return client.call({"command": "numwatchers", "properties": {}}).get("status") == "ok"
        finally:
            client.stop()

    def stop(self) -> float:
        if self._client is not None:
            self._client.stop()
            self._client = None
        return super().stop()

    # -- the API ----------------------------------------------------------------------------------

    def status(self, name: str) -> str:
        return str(self.call("status", name=name)["status"])

    def list(self) -> int:
        return len(self.call("status")["statuses"])

    def running_count(self) -> int:
        # Processes alive across all watchers (circus spawns them before it answers "active").
        return int(self.call("numprocesses")["numprocesses"])

    def pid(self, name: str) -> int | None:
        pids = self.call("list", name=name)["pids"]
        return int(pids[0]) if pids else None

    def request_stop_all(self) -> None:
        self.call("stop", waiting=True)

    def start_stop(self, name: str) -> float:
        self.call("start", name=name, waiting=False)
        t0 = time.perf_counter()
        self.call("stop", name=name, waiting=True)
        return time.perf_counter() - t0
