"""The security matrix of a real opmasd: who gets past the gate, on every entry point.

Generated from the roles the proto declares (opmasd.api.auth.declared_roles), so that the table
cannot drift from the code: every RPC and every kind of caller, over TCP gRPC, over REST on TCP
(each route of rules.routes_of), and each NATS manager command (nats_api.NATS_RPCS). A caller
is admitted when the answer is anything but UNAUTHENTICATED / PERMISSION_DENIED (401 / 403):
the requests are harmless ones (an agent that does not exist, an invalid spec, an empty agents
directory) that fail after the gate, if at all. The unix sockets need no token. Expiry and
revocation take effect on the next request, and no secret ever reaches the daemon's log.
One daemon serves the module; start-time refusals and a non-root user are in test_auth_local.py.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import audit_pb2, auth_pb2, tokens_pb2
from opmasd.api.auth import SERVICES, declared_roles
from opmasd.api.nats_api import NATS_RPCS
from opmasd.api.rest.rules import Route, routes_of
from opmasd.core.auth import Role

from .harness import Sandbox, free_port, sandbox
from .rest_client import UnixHTTPConnection, rest_env

pytestmark = pytest.mark.timeout(60)

ROLES = declared_roles()
ROUTES = routes_of(SERVICES)
STREAMING = {f"/{s.full_name}/{m.name}": m.server_streaming for s in SERVICES for m in s.methods}
NO_AGENT = "no-such-agent"
NO_TOKEN_ID = "0000000000000000"
ADMITTED, UNAUTHENTICATED, PERMISSION_DENIED = "ADMITTED", "UNAUTHENTICATED", "PERMISSION_DENIED"
STREAM_DEADLINE = 0.5
# Harmless requests, one per RPC: they fail after the gate (NOT_FOUND, INVALID_ARGUMENT) or do
# nothing that matters (a discovery of an empty directory, a token more).
HARMLESS: dict[str, Message] = {
    "ListAgents": pb.ListAgentsRequest(),
    "CreateAgent": pb.CreateAgentRequest(agent_id=NO_AGENT, spec=pb.AgentSpec(name="")),
    "GetAgent": pb.GetAgentRequest(agent_id=NO_AGENT),
    "UpdateAgent": pb.UpdateAgentRequest(agent_id=NO_AGENT, spec=pb.AgentSpec(name=NO_AGENT)),
    "DeleteAgent": pb.DeleteAgentRequest(agent_id=NO_AGENT),
    "StartAgent": pb.StartAgentRequest(agent_id=NO_AGENT),
    "StopAgent": pb.StopAgentRequest(agent_id=NO_AGENT),
    "RestartAgent": pb.RestartAgentRequest(agent_id=NO_AGENT),
    "StartAgents": pb.StartAgentsRequest(agent_ids=[NO_AGENT]),
    "StopAgents": pb.StopAgentsRequest(agent_ids=[NO_AGENT]),
    "RestartAgents": pb.RestartAgentsRequest(agent_ids=[NO_AGENT]),
    "GetAgentStatus": pb.GetAgentStatusRequest(agent_id=NO_AGENT),
    "GetAgentMetrics": pb.GetAgentMetricsRequest(agent_id=NO_AGENT),
    "GetAgentLogs": pb.GetAgentLogsRequest(agent_id=NO_AGENT),
    "WatchEvents": pb.WatchEventsRequest(agent_ids=[NO_AGENT]),
    "DiscoverAgents": pb.DiscoverAgentsRequest(),
    "SendCommand": pb.SendCommandRequest(agent_id=NO_AGENT, command="ping"),
    "CreateToken": tokens_pb2.CreateTokenRequest(role=auth_pb2.ROLE_VIEWER, description="matrix"),
    "ListTokens": tokens_pb2.ListTokensRequest(),
    "RevokeToken": tokens_pb2.RevokeTokenRequest(token_id=NO_TOKEN_ID),
    "ListAuditRecords": audit_pb2.ListAuditRecordsRequest(page_size=1),
}
# Every kind of caller; expired, revoked and wrong-secret tokens are admin tokens otherwise.
CALLERS = (
    "none",
    "malformed",
    "unknown",
    "wrong-secret",
    "expired",
    "revoked",
    "viewer",
    "operator",
    "admin",
)
NATS_PARAMS: dict[str, dict[str, Any]] = {"command": {"command": "ping"}}


@dataclass
class Caller:
    authorization: str | None  # the "authorization" value presented; None: none at all
    role: Role | None  # what the daemon must take it for


@dataclass
class World:
    box: Sandbox
    tcp: grpc.Channel  # to the daemon's TCP address, no credentials of its own
    rest_port: int
    rest_socket: str
    callers: dict[str, Caller]
    secrets: list[str]  # every token value presented or made here, for the log check


def expected(path: str, caller: Caller) -> str:
    """What the gate must answer, from the declared role alone."""
    required = ROLES[path]
    if required is None:
        return PERMISSION_DENIED  # a method that declares no role is refused to every caller
    if caller.role is None:
        return UNAUTHENTICATED
    return ADMITTED if caller.role >= required else PERMISSION_DENIED


def timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def secret_of(box: Sandbox, role: auth_pb2.Role.ValueType, expires_at: datetime | None = None) -> str:
    return box.create_token(role, "e2e auth", timestamp(expires_at) if expires_at else None).secret


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    port = free_port()
    with sandbox("auth", env=rest_env(port)) as box:
        rest_socket = str(box.runtime_dir / "rest.sock")
        box.start(env={"OPMAS_REST_SOCKET": rest_socket})
        expires = datetime.now(UTC) + timedelta(seconds=1)
        expired = secret_of(box, auth_pb2.ROLE_ADMIN, expires)
        revoked = secret_of(box, auth_pb2.ROLE_ADMIN)
        box.daemon.tokens.RevokeToken(tokens_pb2.RevokeTokenRequest(token_id=revoked.split("_")[1]))
        admin = box.admin_token()
        _, token_id, secret = admin.split("_", 2)
        callers = {
            "none": Caller(None, None),
            "malformed": Caller("Bearer not-a-token", None),
            "unknown": Caller(f"Bearer opmas_{'0' * 15}1_{secret}", None),  # a real secret, another id
            "wrong-secret": Caller(f"Bearer opmas_{token_id}_{'x' * len(secret)}", None),
            "expired": Caller(f"Bearer {expired}", None),
            "revoked": Caller(f"Bearer {revoked}", None),
            "viewer": Caller(f"Bearer {secret_of(box, auth_pb2.ROLE_VIEWER)}", Role.VIEWER),
            "operator": Caller(f"Bearer {secret_of(box, auth_pb2.ROLE_OPERATOR)}", Role.OPERATOR),
            "admin": Caller(f"Bearer {admin}", Role.ADMIN),
        }
        presented = [c.authorization.removeprefix("Bearer ") for c in callers.values() if c.authorization]
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds() + 0.1))
        yield World(box, box.daemon.channel(box.address), port, rest_socket, callers, presented)


# -- TCP gRPC ---------------------------------------------------------------------------------------


def grpc_outcome(channel: grpc.Channel, path: str, authorization: str | None) -> tuple[str, str]:
    """(verdict, the code seen) of one call of path with its harmless request."""
    request = HARMLESS[path.rpartition("/")[2]].SerializeToString()
    metadata = (("authorization", authorization),) if authorization is not None else None
    try:
        if STREAMING[path]:
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            call = stream(request, metadata=metadata, timeout=STREAM_DEADLINE)
            next(iter(call), None)  # the first message, the end, or the error
            call.cancel()
        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            unary(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        code = err.code().name
        assert code not in ("INTERNAL", "UNKNOWN"), (path, code, err.details())
        return (code if code in (UNAUTHENTICATED, PERMISSION_DENIED) else ADMITTED), code
    return ADMITTED, "OK"


def test_every_rpc_declares_a_role_and_has_a_harmless_request() -> None:
    assert ROLES and all(role is not None for role in ROLES.values()), ROLES
    assert {path.rpartition("/")[2] for path in ROLES} == set(HARMLESS)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("path", sorted(ROLES))
def test_tcp_grpc_gate(world: World, path: str, caller: str) -> None:
    who = world.callers[caller]
    verdict, code = grpc_outcome(world.tcp, path, who.authorization)
    assert verdict == expected(path, who), f"{caller} on {path}: {code}"


def test_the_unix_socket_needs_no_token(world: World) -> None:
    channel = world.box.daemon.channel()
    for path in sorted(ROLES):
        assert grpc_outcome(channel, path, None)[0] == ADMITTED, path
    made = world.box.daemon.tokens.CreateToken(
        tokens_pb2.CreateTokenRequest(role=auth_pb2.ROLE_VIEWER, description="over the socket"), timeout=10
    )
    world.secrets.append(made.secret)
    assert made.token.created_by == "local" and made.secret.startswith(f"opmas_{made.token.token_id}_")


# -- REST ---------------------------------------------------------------------------------------------


def rest_request(route: Route) -> tuple[str, bytes | None]:
    """The route's URL and JSON body for its RPC's harmless request."""
    request = HARMLESS[route.method.name]
    fields = json_format.MessageToDict(request)
    names = {f.name: f.json_name for f in request.DESCRIPTOR.fields}

    def value(match: re.Match[str]) -> str:
        return urllib.parse.quote(str(getattr(request, match.group(1))), safe="")

    path = re.sub(r"\{(\w+)(=[^}]*)?\}", value, route.template.source)
    for variable in route.template.variables:
        fields.pop(names[variable], None)
    if route.body == "*":
        return path, json.dumps(fields).encode()
    if route.body:
        return path, json.dumps(fields.get(names[route.body], {})).encode()
    return (f"{path}?{urllib.parse.urlencode(fields, doseq=True)}" if fields else path), None


def http_call(
    world: World,
    method: str,
    url: str,
    body: bytes | None,
    authorization: str | None,
    unix: bool = False,
    streaming: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request on a connection of its own; a streaming answer
    that began (200) is cut after its status line (a watch never ends)."""
    conn = (
        UnixHTTPConnection(world.rest_socket)
        if unix
        else http.client.HTTPConnection("127.0.0.1", world.rest_port, timeout=15)
    )
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        conn.request(method, url, body=body, headers=headers)
        response = conn.getresponse()  # a stream answers its status after its first message or wait
        status, got = response.status, {k.lower(): v for k, v in response.getheaders()}
        return status, got, b"" if streaming and status == 200 else response.read()
    finally:
        conn.close()


def rest_verdict(status: int, headers: dict[str, str], body: bytes) -> str:
    if status == 401:
        assert headers.get("www-authenticate") == 'Bearer realm="opmasd"', headers
        assert json.loads(body)["code"] == 16, body
        return UNAUTHENTICATED
    if status == 403:
        assert json.loads(body)["code"] == 7, body
        return PERMISSION_DENIED
    assert status < 500 or status == 504, (status, body)
    return ADMITTED


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.http_method} {r.template.source}")
def test_rest_gate(world: World, route: Route, caller: str) -> None:
    who = world.callers[caller]
    url, body = rest_request(route)
    status, headers, data = http_call(
        world, route.http_method, url, body, who.authorization, streaming=route.server_streaming
    )
    verdict = rest_verdict(status, headers, data)
    assert verdict == expected(route.grpc_path, who), (
        f"{caller}: {route.http_method} {url}: {status} {data!r}"
    )


def test_every_rpc_has_a_rest_route() -> None:
    assert {route.grpc_path for route in ROUTES} == set(ROLES)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("path", ["/metrics", "/api/v1/openapi.json", "/healthz", "/readyz"])
def test_rest_fixed_paths(world: World, path: str, caller: str) -> None:
    """Probes are open; the metrics and the document are a viewer's."""
    who = world.callers[caller]
    status, headers, data = http_call(world, "GET", path, None, who.authorization)
    if path in ("/healthz", "/readyz"):
        assert status == 200, (caller, path, status, data)
        return
    want = UNAUTHENTICATED if who.role is None else ADMITTED
    assert rest_verdict(status, headers, data) == want, (caller, path, status, data)
    if want == ADMITTED:
        assert status == 200, data


def test_the_rest_unix_socket_needs_no_token(world: World) -> None:
    for route in ROUTES:
        url, body = rest_request(route)
        status, headers, data = http_call(
            world, route.http_method, url, body, None, unix=True, streaming=route.server_streaming
        )
        assert rest_verdict(status, headers, data) == ADMITTED, (url, status, data)
    for path in ("/metrics", "/api/v1/openapi.json"):
        assert http_call(world, "GET", path, None, None, unix=True)[0] == 200, path


# -- NATS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("command", sorted(NATS_RPCS))
def test_nats_manager_gate(world: World, command: str, caller: str) -> None:
    who = world.callers[caller]
    client = world.box.nats()
    body = {"command": command, "agent_id": "" if command in ("list", "discover") else NO_AGENT}
    body["params"] = NATS_PARAMS.get(command, {})  # type: ignore[assignment]
    if who.authorization is None:
        reply = client.request("agent.manager.command", body, timeout=10, anonymous=True)
    else:
        reply = client.request(
            "agent.manager.command", body, timeout=10, headers={"Authorization": who.authorization}
        )
    code = reply.get("code") if reply.get("status") == "error" else "OK"
    assert code not in ("INTERNAL", "UNKNOWN"), reply
    verdict = code if code in (UNAUTHENTICATED, PERMISSION_DENIED) else ADMITTED
    assert verdict == expected(NATS_RPCS[command], who), f"{caller} on {command}: {reply}"


# -- expiry, revocation, tokens made over TCP -------------------------------------------------------


def refusals(world: World, secret: str) -> list[str]:
    """What TCP gRPC, REST and NATS answer a read with this token: a verdict each."""
    authorization = f"Bearer {secret}"
    verdicts = [grpc_outcome(world.tcp, "/opmas.v1.AgentService/ListAgents", authorization)[0]]
    verdicts.append(rest_verdict(*http_call(world, "GET", "/api/v1/agents", None, authorization)))
    reply = world.box.nats().request(
        "agent.manager.query", {"command": "list"}, timeout=10, headers={"Authorization": authorization}
    )
    verdicts.append(reply.get("code", ADMITTED) if reply["status"] == "error" else ADMITTED)
    return verdicts


def test_an_expired_token_is_refused_from_its_expiry_on(world: World) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    secret = secret_of(world.box, auth_pb2.ROLE_ADMIN, expires)
    world.secrets.append(secret)
    assert refusals(world, secret) == [ADMITTED] * 3
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds() + 0.1))
    assert refusals(world, secret) == [UNAUTHENTICATED] * 3


def test_a_revoked_token_is_refused_on_the_very_next_call(world: World) -> None:
    secret = secret_of(world.box, auth_pb2.ROLE_ADMIN)
    world.secrets.append(secret)
    token_id = secret.split("_")[1]
    assert refusals(world, secret) == [ADMITTED] * 3
    revoked = world.box.daemon.tokens.RevokeToken(
        tokens_pb2.RevokeTokenRequest(token_id=token_id), timeout=10
    )
    assert revoked.HasField("revoked_at")
    assert refusals(world, secret) == [UNAUTHENTICATED] * 3
    listed = world.box.daemon.tokens.ListTokens(tokens_pb2.ListTokensRequest(), timeout=10)
    assert token_id not in {t.token_id for t in listed.tokens}
    everything = world.box.daemon.tokens.ListTokens(tokens_pb2.ListTokensRequest(include_inactive=True))
    assert token_id in {t.token_id for t in everything.tokens}


def test_an_admin_token_makes_tokens_over_rest(world: World) -> None:
    admin = world.callers["admin"].authorization
    body = json.dumps({"role": "ROLE_OPERATOR", "description": "made over REST"}).encode()
    status, _, data = http_call(world, "POST", "/api/v1/tokens", body, admin)
    assert status == 200, data
    made = json.loads(data)
    world.secrets.append(made["secret"])
    assert made["token"]["createdBy"] == f"token:{world.box.admin_token().split('_')[1]}", made
    # An operator token: it may start agents, not make tokens.
    operator = f"Bearer {made['secret']}"
    status, _, data = http_call(world, "POST", "/api/v1/tokens", body, operator)
    assert status == 403, data
    status, _, data = http_call(world, "POST", f"/api/v1/agents/{NO_AGENT}/start", b"{}", operator)
    assert status == 404, data


# -- last: the log ------------------------------------------------------------------------------------

# A whole token anywhere in a log line: "opmas_" + 16 hex digits + "_" + its secret.
TOKEN_PATTERN = re.compile(r"opmas_[0-9a-f]{16}_[A-Za-z0-9_\-]{8,}")


def test_no_secret_reaches_the_log(world: World) -> None:
    """After everything above (run in file order): made, used, revoked and refused tokens."""
    assert len(world.secrets) >= 9
    time.sleep(1.3)  # the audit trail's flush (refusals are logged a burst at a time), then the file
    texts = {"stderr": world.box.daemon.stderr_text()}
    for path in world.box.log_dir.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    assert '"result": "UNAUTHENTICATED"' in texts["stderr"], "the refusals above were not logged at all"
    for where, text in texts.items():
        assert not TOKEN_PATTERN.search(text), (where, TOKEN_PATTERN.search(text))
        for secret in world.secrets:
            assert secret.split("_", 2)[-1] not in text, where
