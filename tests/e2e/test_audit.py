"""The audit trail, read as an admin would: every change made through each entry point is
there with who, from where and the result, secrets redacted; a flood of refused calls is a few
records with their counts; the trail survives a restart and only admins read it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import auth_pb2

from .harness import Sandbox, call_error, create, sandbox, sleeper, wait_for
from .rest_client import rest_env, rest_of

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    from .harness import free_port

    port = free_port()
    with sandbox("audit", env=rest_env(port)) as box:
        box.rest_port = port  # type: ignore[attr-defined]
        box.start()
        yield box


def audit(box: Sandbox, *args: str) -> list[dict[str, Any]]:
    result = box.opmasctl("-o", "json", "audit", "--all", *args)
    assert result.returncode == 0, result.stderr
    records: list[dict[str, Any]] = json.loads(result.stdout)["records"]
    return records


def find(records: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


def test_every_change_through_every_entry_point_is_recorded(box: Sandbox) -> None:
    stub = box.daemon.stub  # the unix socket: the local admin
    create(stub, "audited", sleeper(), environment={"DB_PASSWORD": "hunter2"})
    stub.StartAgent(pb.StartAgentRequest(agent_id="audited"), timeout=10)
    operator = box.create_token(auth_pb2.ROLE_OPERATOR, "audit test")
    box.daemon.tcp_stub(operator.secret).StopAgent(pb.StopAgentRequest(agent_id="audited"), timeout=30)
    rest = rest_of(box)
    assert rest.request("POST", "/api/v1/agents/audited/start", {}).status == 200
    reply = box.nats().request("agent.manager.command", {"command": "restart", "agent_id": "audited"})
    assert reply["status"] == "success", reply
    failed = call_error(lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="no-such-agent"), timeout=10))
    assert failed.code == grpc.StatusCode.NOT_FOUND
    stub.ListAgents(pb.ListAgentsRequest(), timeout=10)  # a read: not recorded

    def recorded() -> list[dict[str, Any]] | None:
        records = audit(box)
        return records if find(records, operation="RestartAgent") else None

    records = wait_for(recorded, 10, what="the NATS restart in the audit trail")
    assert records is not None
    created = find(records, operation="CreateAgent", target="audited")[0]
    assert (created["actor"], created["peer"], created["entryPoint"], created["result"]) == (
        "local",
        "unix:",
        "grpc",
        "OK",
    )
    assert created["parameters"]["spec"]["environment"] == {"DB_PASSWORD": "<redacted>"}
    stopped = find(records, operation="StopAgent", target="audited")[0]
    assert stopped["actor"] == f"token:{operator.token.token_id}" and stopped["peer"].startswith(
        "ipv4:127.0.0.1:"
    )
    assert find(records, operation="StartAgent", entryPoint="rest", target="audited", result="OK")
    assert find(records, operation="RestartAgent", entryPoint="nats", target="audited", result="OK")
    assert find(records, operation="CreateToken", actor="local", result="OK")
    assert find(records, operation="StopAgent", target="no-such-agent", result="NOT_FOUND")
    assert not find(records, operation="ListAgents")
    assert "hunter2" not in json.dumps(records) and "hunter2" not in box.daemon.stderr_text()
    only = audit(box, "--agent", "audited")
    assert only and all(r["target"] == "audited" for r in only)


def test_a_flood_of_refused_calls_is_a_few_records_with_their_counts(box: Sandbox) -> None:
    anonymous = box.daemon.tcp_stub(token=None)
    began = time.monotonic()
    for _ in range(300):
        with pytest.raises(grpc.RpcError):
            anonymous.DeleteAgent(pb.DeleteAgentRequest(agent_id="audited"), timeout=5)
    viewer = box.create_token(auth_pb2.ROLE_VIEWER, "audit viewer")
    rest = rest_of(box, anonymous=True)
    for _ in range(100):
        assert rest.request("POST", "/api/v1/agents/audited:stop", {}).status == 401
    with pytest.raises(grpc.RpcError):
        box.daemon.tcp_stub(viewer.secret).StopAgent(pb.StopAgentRequest(agent_id="audited"), timeout=5)
    time.sleep(1.5)  # one flush
    records = audit(box)
    deletes = find(records, operation="DeleteAgent", actor="anonymous", result="UNAUTHENTICATED")
    # Past the first burst, refusals are paced (api.refusal_pacing): one record per flush.
    assert sum(r["count"] for r in deletes) == 300 and len(deletes) <= time.monotonic() - began + 2
    assert all(r["peer"] == "ipv4:127.0.0.1" for r in deletes)  # the host, not each port
    posts = find(records, actor="anonymous", entryPoint="rest", result="UNAUTHENTICATED")
    assert sum(r["count"] for r in posts) == 100
    denied = find(records, operation="StopAgent", actor=f"token:{viewer.token.token_id}")
    assert [r["result"] for r in denied] == ["PERMISSION_DENIED"]


def test_only_admins_read_the_trail_and_it_survives_a_restart(box: Sandbox) -> None:
    before = len(audit(box))
    viewer = box.create_token(auth_pb2.ROLE_VIEWER, "reader")
    result = box.opmasctl(
        "audit", server=f"127.0.0.1:{box.port}", token=False, env={"OPMAS_TOKEN": viewer.secret}
    )
    assert result.returncode == 5, result.stderr
    box.restart()
    assert len(audit(box)) >= before
