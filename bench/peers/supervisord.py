"""supervisord (from bench/.venv), driven over XML-RPC on its unix socket, as supervisorctl does.

One [program:x] per agent: autostart=true, autorestart=true, startsecs=0 (RUNNING at exec, as
opmasd's agents are configured here: start_seconds 0), stopasgroup/killasgroup=true (a stop
reaches the agent's children, as opmasd's does), redirect_stderr=true (one log per agent, as
opmasd's), stopwaitsecs as the fleet's stop timeout.
"""

from __future__ import annotations

import http.client
import shlex
import socket
import time
import xmlrpc.client
from typing import Any

from common import PEER_VENV, BenchError, bench_env, spawn_daemon, wait_until

from peers.base import Driver, Fleet


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=300)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """xmlrpc.client over a unix socket, keeping the HTTP/1.1 connection alive between calls."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, _UnixConnection(self._path)
        return self._connection[1]


class SupervisordDriver(Driver):
    name = "supervisord"
    settings = (
        "supervisor 4 from PyPI; [program:x] autostart=true autorestart=true startsecs=0 "
        "stopasgroup=true killasgroup=true redirect_stderr=true; loglevel=warn"
    )

    def __init__(self) -> None:
        super().__init__()
        self.socket = self.root / "s.sock"
        self.conf = self.root / "supervisord.conf"
        (self.root / "logs").mkdir()
        self._rpc: Any = None

    def prepare(self, fleet: Fleet) -> None:
        self.fleet = fleet
        r = self.root
        lines = [
            "[unix_http_server]",
            f"file={self.socket}",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={r / 'supervisord.log'}",
            "loglevel=warn",
            f"pidfile={r / 'supervisord.pid'}",
            f"childlogdir={r / 'logs'}",
            "minfds=16384",
            "minprocs=4096",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{self.socket}",
        ]
        programs = [(name, fleet.stop_timeout, fleet.autostart) for name in fleet.names()]
        programs += [(name, timeout, False) for name, timeout in fleet.extra]
        command = shlex.join(fleet.command)  # supervisord splits it with shlex
        for name, stop_timeout, autostart in programs:
            lines += [
                f"[program:{name}]",
                f"command={command}",
                f"autostart={'true' if autostart else 'false'}",
                "autorestart=true",
                "startsecs=0",
                "startretries=100000",
                f"stopwaitsecs={stop_timeout:g}",
                "stopasgroup=true",
                "killasgroup=true",
                "redirect_stderr=true",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def rpc(self) -> Any:
        if self._rpc is None:
            self._rpc = xmlrpc.client.ServerProxy(
                "http://localhost", transport=UnixTransport(str(self.socket))
            )
        return self._rpc

    def boot(self) -> float:
        assert self.fleet is not None
        t0 = time.perf_counter()
        self.popen = spawn_daemon(
            [str(PEER_VENV / "bin" / "supervisord"), "-n", "-c", str(self.conf)], bench_env(), self.log
        )
        wait_until(self._answers, 30.0, interval=0.005, what="supervisord to answer on its socket")
        return self._wait_all_running(self.fleet.n if self.fleet.autostart else 0, t0, 300.0)

    def _answers(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise BenchError(f"supervisord exited with {self.popen.returncode}:\n{self.log_tail()}")
        if not self.socket.exists():
            return False
        try:
            return self.rpc.supervisor.getState()["statename"] == "RUNNING"
        except Exception:
            self._rpc = None  # a half-open connection: start over
            raise

    def stop(self) -> float:
        """stopAllProcesses(wait), then SIGTERM: its own SIGTERM shutdown stops the programs one
        per main-loop turn (seen here: 11-42 s for 100 agents), which would dominate the run."""
        t0 = time.perf_counter()
        if self.popen is not None and self.popen.poll() is None:
            try:
                self.rpc.supervisor.stopAllProcesses(True)
            except (OSError, xmlrpc.client.Error) as exc:
                print(f"supervisord: stopAllProcesses failed ({exc}); SIGTERM only")
        self._rpc = None
        super().stop()
        return time.perf_counter() - t0

    # -- the API ----------------------------------------------------------------------------------

    def status(self, name: str) -> str:
        return str(self.rpc.supervisor.getProcessInfo(name)["statename"])

    def list(self) -> int:
        return len(self.rpc.supervisor.getAllProcessInfo())

    def running_count(self) -> int:
        return sum(1 for info in self.rpc.supervisor.getAllProcessInfo() if info["statename"] == "RUNNING")

    def pid(self, name: str) -> int | None:
        info = self.rpc.supervisor.getProcessInfo(name)
        return int(info["pid"]) if info["statename"] == "RUNNING" and info["pid"] else None

    def request_stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(True)

    def start_stop(self, name: str) -> float:
        self.rpc.supervisor.startProcess(name, False)  # returns once forked: the child may not have exec'd
        t0 = time.perf_counter()
        try:
            self.rpc.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault as fault:  # NOT_RUNNING: it ended by itself meanwhile
            if "NOT_RUNNING" not in fault.faultString:
                raise
        return time.perf_counter() - t0
