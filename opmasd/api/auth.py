"""Who may call what: one gate that every gRPC call, REST request and NATS manager request
passes through.

The role each RPC requires is declared beside it in the proto (option
opmas.v1.required_role) and read from the descriptors here; an RPC of ours that declares none
is refused to every caller. A caller on the local unix socket is an admin (the socket's mode
and group are its access control); any other caller holds the role of the API token it
presents ("authorization: Bearer <token>"), or none. Health checks and server reflection are
open (the schema is public anyway).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable

from google.protobuf.descriptor import ServiceDescriptor

from opmas.v1 import agents_pb2, audit_pb2, auth_pb2, tokens_pb2
from opmasd.api.refusal_pacing import RefusalPacer
from opmasd.core.auth import ApiToken, Caller, Role
from opmasd.core.errors import PermissionDenied, Unauthenticated

# Every service of ours: each of their methods must declare the role it requires.
SERVICES: tuple[ServiceDescriptor, ...] = (
    agents_pb2.DESCRIPTOR.services_by_name["AgentService"],
    tokens_pb2.DESCRIPTOR.services_by_name["TokenService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
)
# Services anyone may call: health checking, and reflection (it tells only the public schema).
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# A presented token longer than this is not looked at (a real one is about 70 characters).
MAX_CREDENTIALS = 512
UNAUTHENTICATED_HINT = (
    "missing or invalid credentials: present an API token as 'authorization: Bearer <token>' "
    "(`opmasctl tokens create` on the daemon's host makes one), or use the local unix socket"
)

# The caller of the request being served (for what it did to be attributed to it).
CURRENT_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("opmas_caller", default=None)


def declared_roles(services: Iterable[ServiceDescriptor] = SERVICES) -> dict[str, Role | None]:
    """Each method's gRPC path ("/opmas.v1.AgentService/ListAgents") and the role it declares
    (None: it declares none)."""
    roles: dict[str, Role | None] = {}
    for service in services:
        for method in service.methods:
            number = method.GetOptions().Extensions[auth_pb2.required_role]
            roles[f"/{service.full_name}/{method.name}"] = Role(number) if number else None
    return roles


def service_of(grpc_path: str) -> str:
    """ "/opmas.v1.AgentService/ListAgents" → "opmas.v1.AgentService"."""
    return grpc_path.lstrip("/").partition("/")[0]


def bearer(authorization: str) -> str:
    """The token of an "authorization" value "Bearer <token>" ("" when it is not one)."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or len(token) > MAX_CREDENTIALS:
        return ""
    return token.strip()


class Gate:
    """Decides who a caller is and whether it may call a method."""

    def __init__(
        self,
        verify: Callable[[str], ApiToken | None],
        *,
        tokens_required: bool = True,
        pacer: RefusalPacer | None = None,
    ) -> None:
        """verify: the token a presented string is, if it is an active one. With
        tokens_required False (auth.enabled: false, allowed only by an unsafe key) every caller
        is an admin. pacer: how fast a host without valid credentials is answered (None: at
        once), on every entry point alike."""
        self._verify = verify
        self._tokens_required = tokens_required
        self._pacer = pacer
        self.roles = declared_roles()

    async def pace_refusal(self, caller: Caller, size: int = 0) -> None:
        """Before answering a caller without valid credentials: wait for its host's turn
        (size: the bytes of the request the wait would keep in memory)."""
        if self._pacer is not None and caller.role is None:
            await self._pacer.pace(caller.peer, size)

    def is_open(self, grpc_path: str) -> bool:
        return service_of(grpc_path) in OPEN_SERVICES

    def caller(
        self, authorization: str, peer: str, entry_point: str, local_role: Role = Role.ADMIN
    ) -> Caller:
        """local_role: what a caller on the unix socket is (the viewers' socket: a viewer)."""
        if peer.startswith("unix:"):
            identity = "local" if local_role is Role.ADMIN else f"local-{local_role.label}"
            return Caller(identity, local_role, peer, entry_point)
        token = bearer(authorization) if authorization else ""
        found = self._verify(token) if token else None
        if found is not None:
            return Caller(f"token:{found.token_id}", found.role, peer, entry_point)
        if not self._tokens_required:
            return Caller("anyone (auth disabled)", Role.ADMIN, peer, entry_point)
        return Caller("anonymous", None, peer, entry_point)

    def check(self, caller: Caller, grpc_path: str) -> None:
        """Unauthenticated without credentials, PermissionDenied when the caller's role is not
        enough (or the method declares none, or is not ours)."""
        required = self.roles.get(grpc_path)
        name = grpc_path.rpartition("/")[2] or grpc_path
        if required is None:
            raise PermissionDenied(f"{name} declares no required role: it is refused to every caller")
        self.require(caller, required, name)

    def require(self, caller: Caller, required: Role, what: str) -> None:
        if caller.role is None:
            raise Unauthenticated(UNAUTHENTICATED_HINT)
        if not caller.may(required):
            held = f"the caller ({caller.identity}) is {caller.role.label}"
            raise PermissionDenied(f"{what} needs the {required.label} role; {held}")


# What a caller below admin sees in place of each environment value of an agent's spec.
HIDDEN = "<hidden>"


def sees_secrets() -> bool:
    """Whether the caller of the request being served may see agents' environment values
    (passwords, keys): admins only. Without a caller (an in-process call of the daemon's own)
    it may."""
    caller = CURRENT_CALLER.get()
    return caller is None or caller.role is Role.ADMIN
