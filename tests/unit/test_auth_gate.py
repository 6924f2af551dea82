"""The gate (api.auth): every RPC of ours declares its role, and who a caller is decides what it
may call — the local socket as admin, a token as its role, anyone else as nobody."""

from __future__ import annotations

import importlib
import pkgutil
from datetime import UTC, datetime

import pytest

import opmas.v1
from opmasd.api.auth import OPEN_SERVICES, SERVICES, Gate, bearer, declared_roles
from opmasd.core.auth import ApiToken, Caller, Role
from opmasd.core.errors import PermissionDenied, Unauthenticated

V, OP, A = Role.VIEWER, Role.OPERATOR, Role.ADMIN
# The table, spelled out: a change of any RPC's role must change this too.
EXPECTED = {
    "AgentService": {
        "ListAgents": V,
        "GetAgent": V,
        "GetAgentStatus": V,
        "GetAgentMetrics": V,
        "GetAgentLogs": V,
        "WatchEvents": V,
        "StartAgent": OP,
        "StopAgent": OP,
        "RestartAgent": OP,
        "StartAgents": OP,
        "StopAgents": OP,
        "RestartAgents": OP,
        "SendCommand": OP,
        "CreateAgent": A,
        "UpdateAgent": A,
        "DeleteAgent": A,
        "DiscoverAgents": A,
    },
    "TokenService": {"CreateToken": A, "ListTokens": A, "RevokeToken": A},
    "AuditService": {"ListAuditRecords": A},
}


def test_every_rpc_declares_the_role_the_design_gives_it() -> None:
    roles = declared_roles()
    assert roles == {
        f"/opmas.v1.{service}/{method}": role
        for service, methods in EXPECTED.items()
        for method, role in methods.items()
    }


def test_every_service_of_the_package_is_behind_the_gate() -> None:
    """A service added to opmas.v1 without being listed in api.auth.SERVICES would have no roles
    at all (and be refused to everyone, or worse, if registered outside the gate)."""
    found = set()
    for module in pkgutil.iter_modules(opmas.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"opmas.v1.{module.name}").DESCRIPTOR
            found |= {service.full_name for service in descriptor.services_by_name.values()}
    assert found == {service.full_name for service in SERVICES}
    assert not found & OPEN_SERVICES


def token(role: Role, token_id: str = "0123456789abcdef") -> ApiToken:
    return ApiToken(token_id, role, "", "", datetime.now(UTC), "test")


TOKENS = {"good-viewer": token(V), "good-admin": token(A, "fedcba9876543210")}


@pytest.mark.parametrize("peer", ["unix:", "unix:/run/opmas/opmasd.sock"])
def test_the_local_socket_is_an_admin_without_a_token(peer: str) -> None:
    caller = Gate(TOKENS.get).caller("", peer, "grpc")
    assert (caller.identity, caller.role) == ("local", A)


@pytest.mark.parametrize(
    ("authorization", "identity", "role"),
    [
        ("Bearer good-viewer", "token:0123456789abcdef", V),
        ("bearer   good-admin ", "token:fedcba9876543210", A),
        ("", "anonymous", None),
        ("good-admin", "anonymous", None),  # no scheme
        ("Basic good-admin", "anonymous", None),
        ("Bearer unknown", "anonymous", None),
        ("Bearer " + "x" * 10_000, "anonymous", None),
    ],
)
def test_a_remote_caller_is_its_tokens_role_or_nobody(
    authorization: str, identity: str, role: Role | None
) -> None:
    for peer in ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "local:rest-gateway", "nats:"):
        caller = Gate(TOKENS.get).caller(authorization, peer, "rest")
        assert (caller.identity, caller.role, caller.peer) == (identity, role, peer)


def test_bearer_reads_only_a_bounded_bearer_token() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("Token abc") == ""
    assert bearer("Bearer " + "a" * 513) == ""


def test_auth_disabled_makes_every_caller_an_admin_only_when_asked() -> None:
    assert Gate(TOKENS.get, tokens_required=False).caller("", "ipv4:10.0.0.1:1", "grpc").role is A
    assert Gate(TOKENS.get).caller("", "ipv4:10.0.0.1:1", "grpc").role is None


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (None, set()),
        (V, {"ListAgents", "WatchEvents"}),
        (OP, {"ListAgents", "WatchEvents", "StopAgents", "SendCommand"}),
        (A, {"ListAgents", "WatchEvents", "StopAgents", "SendCommand", "DeleteAgent", "CreateToken"}),
    ],
)
def test_each_role_may_call_exactly_what_its_rank_allows(role: Role | None, allowed: set[str]) -> None:
    gate = Gate(TOKENS.get)
    caller = Caller("who", role, "ipv4:127.0.0.1:1", "grpc")
    for path in (
        "/opmas.v1.AgentService/ListAgents",
        "/opmas.v1.AgentService/WatchEvents",
        "/opmas.v1.AgentService/StopAgents",
        "/opmas.v1.AgentService/SendCommand",
        "/opmas.v1.AgentService/DeleteAgent",
        "/opmas.v1.TokenService/CreateToken",
    ):
        name = path.rpartition("/")[2]
        if name in allowed:
            gate.check(caller, path)
        else:
            error = Unauthenticated if role is None else PermissionDenied
            with pytest.raises(error):
                gate.check(caller, path)


def test_a_method_without_a_declared_role_is_refused_even_to_the_local_admin() -> None:
    local = Gate(TOKENS.get).caller("", "unix:", "grpc")
    with pytest.raises(PermissionDenied, match="declares no required role"):
        Gate(TOKENS.get).check(local, "/opmas.v1.AgentService/NotARealMethod")
