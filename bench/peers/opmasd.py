"""opmasd, driven over its gRPC API on the unix socket (the way opmasctl talks to it).

The fleet is registered once through CreateAgent(start=true); the daemon is then shut down,
which stops the agents but keeps their desired state, so every boot() is a cold start that
brings up the whole fleet from the store, as supervisord and circus do from their config files.

Features that are not built yet are detected, not assumed: REST (a listener on rest.address),
the NATS bus (opmasd/bus/connection.py wired into app.py) and the systemd backend.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from pathlib import Path

import grpc
from common import BenchError, bench_env, free_port, spawn_daemon, wait_until
from google.protobuf import duration_pb2

import opmasd as opmasd_package
from opmas.v1 import agents_pb2 as pb
from opmas.v1 import agents_pb2_grpc
from peers.base import Driver, Fleet

OPMASD = Path(sys.executable).parent / "opmasd"
PACKAGE = Path(opmasd_package.__file__).resolve().parent
RUNNING = pb.AGENT_STATE_RUNNING


def has_bus() -> bool:
    """The NATS connection exists and the daemon wires it."""
    connection = PACKAGE / "bus" / "connection.py"
    app = PACKAGE / "app.py"
    return connection.exists() and "bus.connection" in app.read_text()


def has_systemd_backend() -> bool:
    return (PACKAGE / "runtime" / "systemd.py").exists()


class OpmasdDriver(Driver):
    name = "opmasd"
    settings = (
        "process runtime, SQLite store; restart_policy on-failure (first restart immediate), "
        "agents.stable_after=0.2s, agents.max_restarts=100000; log_level=warning"
    )

    def __init__(self, nats_url: str = "") -> None:
        super().__init__()
        self.socket = self.root / "run" / "opmasd.sock"
        self.grpc_address = f"127.0.0.1:{free_port()}"
        self.rest_address = f"127.0.0.1:{free_port()}"
        self.nats_url = nats_url
        (self.root / "agents").mkdir()
        self._channel: grpc.Channel | None = None
        self._stub: agents_pb2_grpc.AgentServiceStub | None = None
        self._tcp_channel: grpc.Channel | None = None
        self._tcp_stub: agents_pb2_grpc.AgentServiceStub | None = None
        self._http: http.client.HTTPConnection | None = None
        self._stopped_by_api = False
        self._token = ""
        self.api_spawn_seconds: float | None = None
        self.extra_env: dict[str, str] = {}  # settings of one scenario (9: the systemd runtime)

    def env(self) -> dict[str, str]:
        extra = {
            "OPMAS_SERVICE_STATE_DIR": str(self.root / "state"),
            "OPMAS_SERVICE_RUNTIME_DIR": str(self.root / "run"),
            "OPMAS_SERVICE_LOG_DIR": str(self.root / "log"),
            "OPMAS_SERVICE_LOG_LEVEL": os.environ.get("BENCH_OPMASD_LOG_LEVEL", "warning"),
            "OPMAS_SERVICE_LOG_FORMAT": "json",
            "OPMAS_AGENTS_DIRS": str(self.root / "agents"),
            "OPMAS_AGENTS_STABLE_AFTER": "0.2s",
            "OPMAS_AGENTS_MAX_RESTARTS": "100000",
            "OPMAS_GRPC_ADDRESS": self.grpc_address,
            "OPMAS_REST_ADDRESS": self.rest_address,
        }
        if self.nats_url:
            extra["OPMAS_NATS_URL"] = self.nats_url
        return bench_env({**extra, **self.extra_env})

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def stub(self) -> agents_pb2_grpc.AgentServiceStub:
        if self._stub is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
            self._stub = agents_pb2_grpc.AgentServiceStub(self._channel)
        return self._stub

    def _launch(self) -> float:
        t0 = time.perf_counter()
        self.popen = spawn_daemon([str(OPMASD)], self.env(), self.log)
        wait_until(self._answers, 30.0, interval=0.005, what="opmasd to answer on its socket")
        return t0

    def _answers(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise BenchError(f"opmasd exited with {self.popen.returncode}:\n{self.log_tail()}")
        if not self.socket.exists():
            return False
        self.stub.ListAgents(pb.ListAgentsRequest(page_size=1), timeout=1.0)
        return True

    def prepare(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._launch()
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(fleet.stop_timeout * 1e9))
        at_once = duration_pb2.Duration()
        calls = []
        t0 = time.perf_counter()
        for name in fleet.names():
            # start_seconds 0: RUNNING at exec, as the peers are configured (startsecs=0).
            spec = pb.AgentSpec(name=name, command=fleet.command, stop_timeout=timeout, start_seconds=at_once)
            calls.append(
                self.stub.CreateAgent.future(
                    pb.CreateAgentRequest(agent_id=name, spec=spec, start=fleet.autostart), timeout=120
                )
            )
        for name, stop_timeout in fleet.extra:
            extra_timeout = duration_pb2.Duration()
            extra_timeout.FromNanoseconds(int(stop_timeout * 1e9))
            spec = pb.AgentSpec(
                name=name, command=fleet.command, stop_timeout=extra_timeout, start_seconds=at_once
            )
            calls.append(self.stub.CreateAgent.future(pb.CreateAgentRequest(agent_id=name, spec=spec)))
        for call in calls:
            call.result()
        if fleet.autostart:
            # CreateAgent(start=true) x N at once, until all running: opmasd's spawn through its API.
            self.api_spawn_seconds = self._wait_all_running(fleet.n, t0, 300.0)
        self.stop()

    def boot(self) -> float:
        assert self.fleet is not None
        t0 = self._launch()
        if self._stopped_by_api:
            # StopAgent made the desired state "stopped": start them again (not a measured boot).
            self._stopped_by_api = False
            for call in [
                self.stub.StartAgent.future(pb.StartAgentRequest(agent_id=name), timeout=120)
                for name in self.fleet.names()
            ]:
                call.result()
        return self._wait_all_running(self.fleet.n if self.fleet.autostart else 0, t0, 120.0)

    def stop(self) -> float:
        for channel in (self._channel, self._tcp_channel):
            if channel is not None:
                channel.close()
        self._channel = self._stub = self._tcp_channel = self._tcp_stub = None
        if self._http is not None:
            self._http.close()
            self._http = None
        return super().stop()

    # -- the API ----------------------------------------------------------------------------------

    def _all(self) -> list[pb.Agent]:
        agents: list[pb.Agent] = []
        token = ""
        while True:
            reply = self.stub.ListAgents(pb.ListAgentsRequest(page_size=1000, page_token=token), timeout=30)
            agents.extend(reply.agents)
            token = reply.next_page_token
            if not token:
                return agents

    def status(self, name: str) -> str:
        reply = self.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=name), timeout=10)
        return pb.AgentState.Name(reply.state)

    def list(self) -> int:
        return len(self._all())

    def running_count(self) -> int:
        return sum(1 for agent in self._all() if agent.status.state == RUNNING)

    def pid(self, name: str) -> int | None:
        reply = self.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=name), timeout=10)
        return reply.pid if reply.state == RUNNING and reply.pid else None

    def request_stop_all(self) -> None:
        assert self.fleet is not None
        self._stopped_by_api = True
        # The bulk operation: one request, answered when every agent's processes are gone.
        reply = self.stub.StopAgents(pb.StopAgentsRequest(all=True), timeout=300)
        failed = [r for r in reply.results if r.code != 0]
        if failed or len(reply.results) < self.fleet.n:
            raise RuntimeError(f"StopAgents: {len(reply.results)} results, failed: {failed[:3]}")

    def start_stop(self, name: str) -> float:
        self.stub.StartAgent(pb.StartAgentRequest(agent_id=name), timeout=30)
        t0 = time.perf_counter()
        self.stub.StopAgent(pb.StopAgentRequest(agent_id=name), timeout=60)
        return time.perf_counter() - t0

    # -- the same status call over gRPC/TCP and over REST ------------------------------------------

    def token(self) -> str:
        """A viewer token for the TCP and REST calls (made once, over the socket; kept in the
        database across the daemon's restarts): what a remote client of opmasd presents."""
        if not self._token:
            from opmas.v1 import auth_pb2, tokens_pb2, tokens_pb2_grpc

            self.stub  # noqa: B018  (opens the socket's channel at first use)
            tokens = tokens_pb2_grpc.TokenServiceStub(self._channel)
            request = tokens_pb2.CreateTokenRequest(role=auth_pb2.ROLE_VIEWER, description="bench")
            self._token = tokens.CreateToken(request, timeout=10).secret
        return self._token

    def status_tcp(self, name: str) -> str:
        if self._tcp_stub is None:
            self._tcp_channel = grpc.insecure_channel(self.grpc_address)
            self._tcp_stub = agents_pb2_grpc.AgentServiceStub(self._tcp_channel)
        metadata = (("authorization", f"Bearer {self.token()}"),)
        reply = self._tcp_stub.GetAgentStatus(
            pb.GetAgentStatusRequest(agent_id=name), timeout=10, metadata=metadata
        )
        return pb.AgentState.Name(reply.state)

    def status_rest(self, name: str) -> str:
        """GET /api/v1/agents/{id}/status on one kept-alive HTTP/1.1 connection."""
        if self._http is None:
            host, port = self.rest_address.rsplit(":", 1)
            self._http = http.client.HTTPConnection(host, int(port), timeout=10)
        self._http.request(
            "GET", f"/api/v1/agents/{name}/status", headers={"Authorization": f"Bearer {self.token()}"}
        )
        response = self._http.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"REST status of {name}: HTTP {response.status}: {body[:200]!r}")
        return str(json.loads(body).get("state", ""))

    def has_rest(self) -> bool:
        """opmasd answers the status call over REST on rest.address."""
        assert self.fleet is not None
        try:
            self.status_rest(self.fleet.names()[0])
        except (OSError, http.client.HTTPException, BenchError, ValueError):
            if self._http is not None:
                self._http.close()
                self._http = None
            return False
        return True

    def heartbeat_seen_after(self, name: str) -> float | None:
        """The agent's last heartbeat time (seconds since the epoch), None when there is none."""
        reply = self.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=name), timeout=10)
        if not reply.HasField("last_heartbeat_time"):
            return None
        return reply.last_heartbeat_time.ToNanoseconds() / 1e9

    def database_path(self) -> Path:
        return self.root / "state" / "opmas.db"
