"""Each agent's own NATS login on a real opmasd's embedded server (issue 11), end to end.

- an agent registered after opmasd started gets a login of its own (never opmasd's), connects
  with it, heartbeats on its own subject and answers a command;
- with the credentials it was started with, it cannot forge another agent's heartbeat nor send
  another agent a command, and a heartbeat naming another agent than its subject is dropped;
- a deleted agent's login stops working;
- opmasd restarted (killed) with agents running: they log in again to the new server with the
  same password, heartbeat and answer commands.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from opmas.v1 import agents_pb2 as pb
from opmas.v1.agents_pb2_grpc import AgentServiceStub

from .harness import Sandbox, create, proc_environ, sandbox, sleeper, status, wait_for
from .nats_client import NatsClient
from .test_nats import heard_after, probe_package, result_of, send, start

pytestmark = pytest.mark.timeout(120)


def login_accepted(port: int, user: str, password: str) -> bool:
    """Whether the server lets user in (the NATS text protocol: CONNECT then PING)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # INFO
        sock.sendall(f'CONNECT {{"user":"{user}","pass":"{password}","verbose":false}}\r\nPING\r\n'.encode())
        return reader.readline().startswith(b"PONG")


def agent_login(box: Sandbox, agent_id: str) -> dict[str, str]:
    """The NATS settings the agent's process was started with."""
    env = proc_environ(box.agent_pids(agent_id)[0])
    return {key: env.get(key, "") for key in ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX")}


def as_agent(box: Sandbox, login: dict[str, str]) -> NatsClient:
    host = login["NATS_URL"].removeprefix("nats://")
    return box.nats(f"nats://{login['NATS_USER']}:{login['NATS_PASSWORD']}@{host}")


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox("nats-logins") as b:
        b.start()
        yield b


def test_an_agent_registered_at_run_time_logs_in_as_itself(box: Sandbox) -> None:
    stub: AgentServiceStub = box.stub
    package = probe_package(box.extra_dir, "late-probe")
    stub.CreateAgent(pb.CreateAgentRequest(manifest_path=str(package / "agent.yaml")), timeout=10)
    start(stub, "late-probe")  # running once its first heartbeat since the start arrived
    login = agent_login(box, "late-probe")
    opmasd_password = (box.state_dir / "nats" / "credentials").read_text().strip()
    assert login["NATS_USER"] == "agent-late-probe" and login["NATS_INBOX_PREFIX"] == "_INBOX.late-probe"
    assert login["NATS_PASSWORD"] and login["NATS_PASSWORD"] != opmasd_password
    assert login_accepted(box.embedded_nats_port(), login["NATS_USER"], login["NATS_PASSWORD"])
    reply = send(stub, "late-probe", "echo", {"x": 1})
    assert reply.status == "success" and result_of(reply)["params"] == {"x": 1}


def test_an_agents_login_cannot_forge_another_agents_heartbeat_nor_command_it(box: Sandbox) -> None:
    stub: AgentServiceStub = box.stub
    package = probe_package(box.extra_dir, "mallory")
    stub.CreateAgent(pb.CreateAgentRequest(manifest_path=str(package / "agent.yaml")), timeout=10)
    start(stub, "mallory")
    create(stub, "victim", sleeper(), start=True)  # never heartbeats by itself
    wait_for(lambda: status(stub, "victim").pid, what="victim running")
    watcher = box.nats()
    commands = watcher.subscribe("agent.victim.command")
    mallory = as_agent(box, agent_login(box, "mallory"))
    forged = {"agent_id": "victim", "status": "running"}
    for subject in ("agent.victim.status", "agent.status", "agent.mallory.status"):
        mallory.publish(subject, forged)
    mallory.publish("agent.victim.command", {"command": "stop", "agent_id": "victim", "params": {}})
    mallory.flush()
    # opmasd's own login delivers the same forgery on mallory's subject: dropped by the intake too.
    watcher.publish("agent.mallory.status", forged)
    watcher.flush()
    time.sleep(0.5)
    assert not status(stub, "victim").HasField("last_heartbeat_time")
    assert commands == []
    # What does arrive on the victim's own subject is taken (the check above would see it).
    before = time.time_ns()
    watcher.publish("agent.victim.status", forged)
    heard_after(stub, "victim", before)


def test_a_deleted_agents_login_stops_working(box: Sandbox) -> None:
    stub: AgentServiceStub = box.stub
    package = probe_package(box.extra_dir, "doomed")
    stub.CreateAgent(pb.CreateAgentRequest(manifest_path=str(package / "agent.yaml")), timeout=10)
    start(stub, "doomed")
    login = agent_login(box, "doomed")
    port = box.embedded_nats_port()
    assert login_accepted(port, login["NATS_USER"], login["NATS_PASSWORD"])
    stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="doomed"), timeout=20)
    wait_for(
        lambda: not login_accepted(port, login["NATS_USER"], login["NATS_PASSWORD"]),
        10,
        what="the deleted agent's login to be refused",
    )


def test_agents_log_in_again_after_opmasd_restarts(box: Sandbox) -> None:
    stub: AgentServiceStub = box.stub
    for agent_id in ("survivor-1", "survivor-2"):
        probe_package(box.agents_dir, agent_id)
    stub.DiscoverAgents(pb.DiscoverAgentsRequest(), timeout=15)
    for agent_id in ("survivor-1", "survivor-2"):
        start(stub, agent_id)
    logins = {agent_id: agent_login(box, agent_id) for agent_id in ("survivor-1", "survivor-2")}
    pids = {agent_id: box.agent_pids(agent_id) for agent_id in logins}
    box.restart(how="kill")  # agents keep running; the new opmasd starts a new nats-server
    stub = box.stub
    after = time.time_ns()
    for agent_id, login in logins.items():
        assert box.agent_pids(agent_id) == pids[agent_id]  # re-adopted, not restarted
        heard_after(stub, agent_id, after, timeout=20)  # reconnected with the same password
        assert login_accepted(box.embedded_nats_port(), login["NATS_USER"], login["NATS_PASSWORD"])
        assert send(stub, agent_id, "ping").status == "success"
