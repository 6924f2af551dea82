"""What an outside review of the first security step found, each checked against a real daemon:
a stream ends once its token is revoked, the credentials checked are the credentials used, a
refused request with a body does not keep its connection (nor has its body read), and only
admins see the values of agents' environments."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import grpc
import pytest

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import auth_pb2, tokens_pb2

from .harness import Sandbox, create, free_port, sandbox, sleeper, wait_for
from .rest_client import Rest, rest_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    port = free_port()
    with sandbox("hardening", env=rest_env(port)) as box:
        box.rest_port = port  # type: ignore[attr-defined]
        box.start()
        create(box.daemon.stub, "h1", sleeper())
        yield box


def test_an_open_stream_ends_when_its_token_is_revoked(box: Sandbox) -> None:
    viewer = box.create_token(auth_pb2.ROLE_VIEWER, "streamer")
    events = box.daemon.tcp_stub(viewer.secret).WatchEvents(
        pb.WatchEventsRequest(agent_ids=["h1"]), timeout=30
    )
    stub = box.daemon.stub
    stub.StartAgent(pb.StartAgentRequest(agent_id="h1"), timeout=10)
    assert next(events).agent_id == "h1"  # the stream is live
    box.daemon.tokens.RevokeToken(tokens_pb2.RevokeTokenRequest(token_id=viewer.token.token_id), timeout=10)
    stub.StopAgent(pb.StopAgentRequest(agent_id="h1"), timeout=10)
    with pytest.raises(grpc.RpcError) as ended:
        for _ in range(10):
            next(events)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value


def test_only_the_authorization_header_carries_credentials(box: Sandbox) -> None:
    viewer = box.create_token(auth_pb2.ROLE_VIEWER, "v")
    operator = box.create_token(auth_pb2.ROLE_OPERATOR, "o")
    rest = Rest(f"127.0.0.1:{box.rest_port}", token=viewer.secret)  # type: ignore[attr-defined]
    smuggled = rest.post(
        "/api/v1/agents/h1/stop", headers={"Grpc-Metadata-Authorization": f"Bearer {operator.secret}"}
    )
    assert smuggled.status == 403, smuggled.body  # the viewer's call, not the operator's
    twice = (
        f"POST /api/v1/agents/h1/stop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {viewer.secret}\r\n"
        f"Authorization: Bearer {operator.secret}\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    status, _, body = raw(box, twice.encode())
    assert status == 400 and "Authorization" in json.loads(body)["message"]


def test_a_refusal_of_a_request_with_a_body_closes_the_connection(box: Sandbox) -> None:
    head = b"POST /api/v1/agents/h1:stop HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, headers, _ = raw(box, head + b"100000\r\n" + b"x" * 1000, read_to_close=True)
    assert status == 401
    assert headers.get("connection", "").lower() == "close"
    assert headers.get("www-authenticate") == 'Bearer realm="opmasd"'


def raw(box: Sandbox, request: bytes, read_to_close: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", box.rest_port), timeout=5) as sock:  # type: ignore[attr-defined]
        sock.sendall(request)
        data = b""

        def answered() -> bool:
            nonlocal data
            chunk = sock.recv(65536)
            data += chunk
            if b"\r\n\r\n" not in data:
                return not chunk and bool(data)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            return len(body) >= length or not chunk

        wait_for(answered, 5, what="an answer")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_only_admins_see_the_values_of_an_agents_environment(box: Sandbox) -> None:
    create(box.daemon.stub, "with-secret", sleeper(), environment={"DB_PASSWORD": "hunter2"})
    for role, seen in (
        (auth_pb2.ROLE_VIEWER, "<hidden>"),
        (auth_pb2.ROLE_OPERATOR, "<hidden>"),
        (auth_pb2.ROLE_ADMIN, "hunter2"),
    ):
        token = box.create_token(role, "env").secret
        stub = box.daemon.tcp_stub(token)
        assert stub.GetAgent(pb.GetAgentRequest(agent_id="with-secret"), timeout=10).spec.environment == {
            "DB_PASSWORD": seen
        }
        listed = {a.agent_id: a for a in stub.ListAgents(pb.ListAgentsRequest(), timeout=10).agents}
        assert listed["with-secret"].spec.environment == {"DB_PASSWORD": seen}
        rest = Rest(f"127.0.0.1:{box.rest_port}", token=token)  # type: ignore[attr-defined]
        assert rest.get("/api/v1/agents/with-secret").json()["spec"]["environment"] == {"DB_PASSWORD": seen}
        nats = box.nats().request(
            "agent.manager.query",
            {"command": "get", "agent_id": "with-secret"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert nats["result"]["spec"]["environment"] == {"DB_PASSWORD": seen}, nats
    local = box.daemon.stub.GetAgent(pb.GetAgentRequest(agent_id="with-secret"), timeout=10)
    assert local.spec.environment == {"DB_PASSWORD": "hunter2"}  # the unix socket: an admin
