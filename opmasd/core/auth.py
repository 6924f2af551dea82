"""Who is calling and what they may do: roles, API tokens, and the caller of a request.

The role each RPC requires is declared in the proto (option opmas.v1.required_role) and read
by the api layer; these are the domain's own types for it, free of wire types, shared by the
manager (which keeps the tokens) and the api (which checks every call against them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class Role(enum.IntEnum):
    """What a caller may do; each role may do everything the roles below it may. The values
    are the proto's Role numbers."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The role as operators write it: "viewer", "operator", "admin"."""
        return self.name.lower()


# A token as presented: "opmas_" + token id (16 lowercase hex digits) + "_" + secret.
TOKEN_PREFIX = "opmas_"
TOKEN_ID_LENGTH = 16
MAX_DESCRIPTION = 256


@dataclass(frozen=True)
class ApiToken:
    """A bearer token as kept: everything but its secret, of which only a hash is stored."""

    token_id: str
    role: Role
    description: str
    # SHA-256 of the secret, hex: the secret is 256 random bits, so a slow hash adds nothing.
    secret_hash: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class Caller:
    """Who made a request, as the api established it: "local" (the unix socket: its file mode
    and group are its access control), "token:<id>", or "anonymous" (no valid credentials),
    with the peer address it came from and the role it holds (None: none)."""

    identity: str
    role: Role | None
    peer: str
    entry_point: str  # "grpc", "rest" or "nats"

    def may(self, required: Role) -> bool:
        return self.role is not None and self.role >= required
