"""TokenService over grpc.aio: create, list and revoke API tokens (manager.tokens keeps and
logs them).

Only admins reach it (each RPC declares ROLE_ADMIN; api.auth_interceptor checks). A token's
secret is in the response of its creation and nowhere else: not kept, not logged.
"""

from __future__ import annotations

from typing import Any

import grpc

from opmas.v1 import auth_pb2, tokens_pb2, tokens_pb2_grpc
from opmasd.api import convert
from opmasd.api.auth import CURRENT_CALLER
from opmasd.api.grpc_servicer import unary
from opmasd.core.auth import ApiToken, Role
from opmasd.core.errors import InvalidArgument
from opmasd.manager import TokenKeeper

Context = grpc.aio.ServicerContext[Any, Any]


def role_from_pb(value: int) -> Role:
    try:
        return Role(value)
    except ValueError:
        names = ", ".join(auth_pb2.Role.Name(auth_pb2.Role.ValueType(r.value)) for r in Role)
        raise InvalidArgument.single("role", f"must be one of {names}, got {value}") from None


def token_to_pb(token: ApiToken) -> tokens_pb2.ApiToken:
    message = tokens_pb2.ApiToken(
        token_id=token.token_id,
        role=auth_pb2.Role.ValueType(token.role.value),
        description=token.description,
        created_at=convert.timestamp(token.created_at),
        created_by=token.created_by,
    )
    if token.expires_at is not None:
        message.expires_at.CopyFrom(convert.timestamp(token.expires_at))
    if token.revoked_at is not None:
        message.revoked_at.CopyFrom(convert.timestamp(token.revoked_at))
    return message


class TokenService(tokens_pb2_grpc.TokenServiceServicer):
    def __init__(self, tokens: TokenKeeper) -> None:
        self._tokens = tokens

    @unary
    async def CreateToken(
        self, request: tokens_pb2.CreateTokenRequest, context: Context
    ) -> tokens_pb2.CreateTokenResponse:
        role = role_from_pb(request.role)
        expires_at = (
            convert.when(request.expires_at, "expires_at") if request.HasField("expires_at") else None
        )
        caller = CURRENT_CALLER.get()
        created_by = caller.identity if caller is not None else "unknown"
        token, secret = await self._tokens.create(role, request.description, expires_at, created_by)
        return tokens_pb2.CreateTokenResponse(token=token_to_pb(token), secret=secret)

    @unary
    async def ListTokens(
        self, request: tokens_pb2.ListTokensRequest, context: Context
    ) -> tokens_pb2.ListTokensResponse:
        tokens = self._tokens.list(include_inactive=request.include_inactive)
        return tokens_pb2.ListTokensResponse(tokens=[token_to_pb(t) for t in tokens])

    @unary
    async def RevokeToken(
        self, request: tokens_pb2.RevokeTokenRequest, context: Context
    ) -> tokens_pb2.ApiToken:
        return token_to_pb(await self._tokens.revoke(request.token_id))
