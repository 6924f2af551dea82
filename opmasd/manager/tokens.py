"""TokenKeeper: the API tokens remote callers present, created, revoked, listed and verified.

A token as presented is "opmas_<token id>_<secret>": the id (16 lowercase hex digits) names its
row, the secret (256 random bits) proves the caller holds it. Only the secret's SHA-256 is
kept, in the store and in memory; the whole token is returned once, by `create`, and is never
stored or logged.

Every change is committed in the store before it takes effect in memory, so a token that
works here is one the store has (and a revocation acknowledged is one the store has).
`verify` runs on every request: it is synchronous and reads memory only. `refresh` reloads
from the store, so that in a fleet sharing one PostgreSQL the tokens created or revoked on
another node take effect here too; the manager runs it on an interval.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime

import structlog

from opmasd.core.auth import MAX_DESCRIPTION, TOKEN_ID_LENGTH, TOKEN_PREFIX, ApiToken, Role
from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    StoreError,
    StoreRejected,
    Unavailable,
)
from opmasd.manager.persistence import WriteBehind
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)

# Longer than any token this code makes (6 + 16 + 1 + 43 characters): refused unparsed.
MAX_PRESENTED = 200
# The created_by column's width.
MAX_CREATED_BY = 128
_TOKEN_ID = re.compile(f"[0-9a-f]{{{TOKEN_ID_LENGTH}}}")
_PRESENTED = re.compile(
    f"{re.escape(TOKEN_PREFIX)}([0-9a-f]{{{TOKEN_ID_LENGTH}}})_([A-Za-z0-9_-]+)", re.ASCII
)


def secret_hash(secret: str) -> str:
    """How a secret is kept: its SHA-256, hex (the secret is random: a slow hash adds nothing)."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class TokenKeeper:
    def __init__(self, store: AgentStore, writes: WriteBehind, clock: Clock = SYSTEM_CLOCK) -> None:
        self._store = store
        self._writes = writes
        self._clock = clock
        self._tokens: dict[str, ApiToken] = {}
        self._loaded = False
        # Counts changes made here, so that a refresh read before one does not undo it.
        self._changes = 0

    @property
    def loaded(self) -> bool:
        """Whether the tokens were read from the store at least once (until then none verifies)."""
        return self._loaded

    async def load(self) -> None:
        """Every token into memory, replacing what was there; StoreError when the store fails."""
        tokens = await self._writes.call(self._store.load_tokens, "load API tokens")
        self._replace(tokens)
        log.info("API tokens loaded", tokens=len(self._tokens))

    async def refresh(self) -> None:
        """Reload from the store; while it fails, keep the tokens known (a warning says why).

        The manager's start uses this too: a node started while a shared database is away runs
        on, refusing every token until a later refresh reads them."""
        changes = self._changes
        try:
            tokens = await self._writes.call(self._store.load_tokens, "reload API tokens")
        except StoreError as exc:
            if self._loaded:
                log.warning("API tokens not reloaded: the store failed; the known ones stay", error=str(exc))
            else:
                log.warning(
                    "API tokens not loaded: every token is refused until the store answers", error=str(exc)
                )
            return
        if changes != self._changes:
            return  # a change made here meanwhile may be missing from what was read: next time
        if not self._loaded:
            log.info("API tokens loaded", tokens=len(tokens))
        self._replace(tokens)

    async def create(
        self, role: Role, description: str, expires_at: datetime | None, created_by: str
    ) -> tuple[ApiToken, str]:
        """A new token, committed: its record and the whole token string, to show once.

        InvalidArgument naming each bad field; UNAVAILABLE when the store cannot commit it."""
        now = self._clock.now()
        expires_at = self._check_new(role, description, expires_at, now)
        token_id = secrets.token_hex(TOKEN_ID_LENGTH // 2)
        while token_id in self._tokens:  # 64 random bits: never, but a collision must not replace
            token_id = secrets.token_hex(TOKEN_ID_LENGTH // 2)
        secret = secrets.token_urlsafe(32)
        token = ApiToken(
            token_id=token_id,
            role=role,
            description=description,
            secret_hash=secret_hash(secret),
            created_at=now.astimezone(UTC),
            created_by=_printable(created_by)[:MAX_CREATED_BY],
            expires_at=expires_at,
        )
        await self._commit(token, "created")
        self._tokens[token_id] = token
        log.info(
            "API token created",
            token_id=token_id,
            role=role.label,
            created_by=token.created_by,
            expires_at=expires_at.isoformat() if expires_at else None,
        )
        return token, f"{TOKEN_PREFIX}{token_id}_{secret}"

    async def revoke(self, token_id: str) -> ApiToken:
        """Revoke the token, committed first; a revoked one comes back as it is.

        InvalidArgument for a malformed id, NotFound for an unknown one, UNAVAILABLE when the
        store cannot commit it."""
        if not isinstance(token_id, str) or not _TOKEN_ID.fullmatch(token_id):
            raise InvalidArgument.single(
                "token_id", f"must be {TOKEN_ID_LENGTH} lowercase hexadecimal digits"
            )
        if not self._loaded:
            await self.refresh()
        token = self._tokens.get(token_id)
        if token is None:
            if not self._loaded:
                raise Unavailable("the tokens are not loaded yet: the database is unavailable")
            raise NotFound("token", token_id)
        if token.revoked_at is not None:
            return token
        revoked = dataclasses.replace(token, revoked_at=self._clock.now().astimezone(UTC))
        await self._commit(revoked, "revoked")
        self._tokens[token_id] = revoked
        log.info("API token revoked", token_id=token_id, role=revoked.role.label)
        return revoked

    def verify(self, presented: str) -> ApiToken | None:
        """The active token `presented` is, or None (malformed, unknown, wrong secret, expired,
        revoked). Cheap, and never raises."""
        if not isinstance(presented, str) or len(presented) > MAX_PRESENTED:
            return None
        parsed = _PRESENTED.fullmatch(presented)
        if parsed is None:
            return None
        token = self._tokens.get(parsed.group(1))
        if token is None:
            return None
        try:
            matches = hmac.compare_digest(secret_hash(parsed.group(2)), token.secret_hash)
        except (TypeError, ValueError):  # a stored hash that is not ASCII text matches nothing
            return None
        if not matches or not token.active(self._clock.now()):
            return None
        return token

    def list(self, include_inactive: bool = False) -> builtins.list[ApiToken]:
        """The tokens, newest first; only the active ones unless include_inactive."""
        now = self._clock.now()
        tokens = [t for t in self._tokens.values() if include_inactive or t.active(now)]
        return sorted(tokens, key=lambda t: (t.created_at, t.token_id), reverse=True)

    # -- the rest -------------------------------------------------------------------------------

    def _check_new(
        self, role: Role, description: str, expires_at: datetime | None, now: datetime
    ) -> datetime | None:
        """The request's violations, all at once; the expiry in UTC."""
        violations: builtins.list[FieldViolation] = []
        if not isinstance(role, Role):
            names = ", ".join(r.label for r in Role)
            violations.append(FieldViolation("role", f"must be one of {names}, not {role!r}"))
        if not isinstance(description, str):
            violations.append(FieldViolation("description", "must be text"))
        elif len(description) > MAX_DESCRIPTION:
            violations.append(FieldViolation("description", f"is longer than {MAX_DESCRIPTION} characters"))
        elif not description.isprintable():
            violations.append(
                FieldViolation("description", "must be printable: no control characters or line breaks")
            )
        if expires_at is not None:
            if not isinstance(expires_at, datetime):
                violations.append(FieldViolation("expires_at", "must be a time"))
            elif expires_at.tzinfo is None or expires_at.utcoffset() is None:
                violations.append(FieldViolation("expires_at", "must have a time zone"))
            elif expires_at <= now:
                violations.append(FieldViolation("expires_at", "must be in the future"))
            else:
                expires_at = expires_at.astimezone(UTC)
        if violations:
            raise InvalidArgument(violations)
        return expires_at

    def _replace(self, tokens: builtins.list[ApiToken]) -> None:
        self._tokens = {token.token_id: token for token in tokens}
        self._loaded = True

    async def _commit(self, token: ApiToken, done: str) -> None:
        """Save the token's row, or raise: StoreRejected as it is, any other failure (or no
        answer within the commit timeout) as Unavailable."""
        self._changes += 1
        what = f"save API token {token.token_id}"
        try:
            call = self._writes.call(lambda: self._store.save_token(token), what)
            await asyncio.wait_for(call, self._writes.commit_timeout)
        except StoreRejected:
            raise
        except StoreError as exc:
            raise Unavailable(f"the token was not {done}: the database is unavailable: {exc}") from exc
        except TimeoutError as exc:
            raise Unavailable(
                f"the token was not {done}: the database did not answer within "
                f"{self._writes.commit_timeout:g}s (the write may still land)"
            ) from exc
        finally:
            self._changes += 1


def _printable(text: str) -> str:
    """Text with every non-printable character replaced by "?" (it is stored and shown)."""
    return "".join(c if c.isprintable() else "?" for c in text)
