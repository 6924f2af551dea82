"""TokenKeeper over MemoryStore and a fake clock: what verifies and what does not, expiry and
revocation, validation naming the field, commits before memory, and secrets kept out of the
store and the logs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from structlog.testing import capture_logs

from opmasd.core.auth import MAX_DESCRIPTION, ApiToken, Role
from opmasd.core.errors import InvalidArgument, NotFound, StoreError, Unavailable
from opmasd.manager import AgentManager, ManagerSettings, TokenKeeper
from opmasd.manager.persistence import WriteBehind
from opmasd.testing.clock import FakeClock
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore


@dataclass
class Parts:
    keeper: TokenKeeper
    store: MemoryStore
    clock: FakeClock


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    store, clock = MemoryStore(), FakeClock()
    writes = WriteBehind(store, clock)
    keeper = TokenKeeper(store, writes, clock)
    await keeper.load()
    yield Parts(keeper, store, clock)
    await writes.close(1.0)


def fields(violation: InvalidArgument) -> list[str]:
    return [v.field for v in violation.violations]


async def test_a_created_token_verifies_with_its_role(parts: Parts) -> None:
    token, whole = await parts.keeper.create(Role.OPERATOR, "ci deploys", None, "local")
    assert whole.startswith(f"opmas_{token.token_id}_")
    assert len(token.token_id) == 16 and set(token.token_id) <= set("0123456789abcdef")
    assert (token.role, token.description, token.created_by) == (Role.OPERATOR, "ci deploys", "local")
    assert token.created_at == parts.clock.now()
    assert (token.expires_at, token.revoked_at) == (None, None)
    verified = parts.keeper.verify(whole)
    assert verified is not None and verified.role is Role.OPERATOR
    assert parts.keeper.list() == [token]


async def test_only_exact_tokens_verify(parts: Parts) -> None:
    token, whole = await parts.keeper.create(Role.ADMIN, "", None, "local")
    other, _ = await parts.keeper.create(Role.VIEWER, "", None, "local")
    secret = whole.removeprefix(f"opmas_{token.token_id}_")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    refused = [
        f"opmas_{token.token_id}_{flipped}",  # wrong secret
        f"opmas_{other.token_id}_{secret}",  # another token's id
        f"opmas_{'0' * 16}_{secret}",  # unknown id
        whole[:-1],  # truncated
        whole[:20],
        whole + "x",
        whole.upper(),
        f"opmas_{token.token_id}_",
        f"opmas_{token.token_id}",
        f"OPMAS_{token.token_id}_{secret}",
        f" {whole}",
        f"{whole}\n",
        f"Bearer {whole}",
        "",
        "garbage",
        "opmas_",
        "opmas___",
        "x" * 10_000,
        whole + "a" * 10_000,
        f"opmas_{token.token_id}_{secret[:-1]}é",  # non-ASCII
        f"opmas_{token.token_id}_{secret[:-1]}\ud800",  # a lone surrogate: cannot even be encoded
        "\uff4f\uff50\uff4d\uff41\uff53_" + whole[6:],  # full-width letters
        "\x00" * 100,
    ]
    for presented in refused:
        assert parts.keeper.verify(presented) is None, repr(presented[:80])
    assert parts.keeper.verify(whole) == token


@pytest.mark.parametrize("presented", [None, b"opmas_", 42, ["opmas_"]])
async def test_verify_never_raises_even_for_what_is_not_text(parts: Parts, presented: Any) -> None:
    assert parts.keeper.verify(presented) is None


async def test_expiry_takes_effect_exactly_when_the_clock_passes_it(parts: Parts) -> None:
    expires = parts.clock.now() + timedelta(seconds=60)
    token, whole = await parts.keeper.create(Role.VIEWER, "short", expires, "local")
    assert token.expires_at == expires
    parts.clock.advance(59.5)
    assert parts.keeper.verify(whole) == token
    assert parts.keeper.list() == [token]
    parts.clock.advance(0.5)  # now == expires_at: no longer active
    assert parts.keeper.verify(whole) is None
    assert parts.keeper.list() == []
    assert parts.keeper.list(include_inactive=True) == [token]


async def test_expiry_in_another_time_zone_is_kept_in_utc(parts: Parts) -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    expires = (parts.clock.now() + timedelta(hours=1)).astimezone(ist)
    token, _ = await parts.keeper.create(Role.VIEWER, "", expires, "local")
    assert token.expires_at == expires and token.expires_at is not None
    assert token.expires_at.tzinfo is UTC


async def test_revocation_takes_effect_on_the_next_verify(parts: Parts) -> None:
    token, whole = await parts.keeper.create(Role.ADMIN, "", None, "local")
    assert parts.keeper.verify(whole) == token
    parts.clock.advance(5)
    revoked = await parts.keeper.revoke(token.token_id)
    assert revoked.revoked_at == parts.clock.now()
    assert parts.keeper.verify(whole) is None
    assert parts.store.tokens[token.token_id] == revoked  # committed
    parts.clock.advance(5)
    assert await parts.keeper.revoke(token.token_id) == revoked  # again: unchanged
    assert parts.keeper.list() == []
    assert parts.keeper.list(include_inactive=True) == [revoked]


async def test_revoking_an_unknown_or_malformed_id(parts: Parts) -> None:
    with pytest.raises(NotFound) as unknown:
        await parts.keeper.revoke("0123456789abcdef")
    assert (unknown.value.resource_type, unknown.value.name) == ("token", "0123456789abcdef")
    for bad in ["", "0123", "0123456789ABCDEF", "0123456789abcdeg", "0123456789abcdef0", "../" * 6, 7]:
        with pytest.raises(InvalidArgument) as caught:
            await parts.keeper.revoke(bad)  # type: ignore[arg-type]
        assert fields(caught.value) == ["token_id"], bad


@pytest.mark.parametrize(
    ("role", "description", "expires_in", "field"),
    [
        (2, "", None, "role"),
        ("admin", "", None, "role"),
        (None, "", None, "role"),
        (Role.VIEWER, "d" * (MAX_DESCRIPTION + 1), None, "description"),
        (Role.VIEWER, "two\nlines", None, "description"),
        (Role.VIEWER, "nul\x00", None, "description"),
        (Role.VIEWER, "\x1b[31mred", None, "description"),
        (Role.VIEWER, None, None, "description"),
        (Role.VIEWER, "", 0.0, "expires_at"),
        (Role.VIEWER, "", -1.0, "expires_at"),
    ],
)
async def test_bad_requests_name_the_field(
    parts: Parts, role: Any, description: Any, expires_in: float | None, field: str
) -> None:
    expires = None if expires_in is None else parts.clock.now() + timedelta(seconds=expires_in)
    with pytest.raises(InvalidArgument) as caught:
        await parts.keeper.create(role, description, expires, "local")
    assert fields(caught.value) == [field]
    assert parts.keeper.list(include_inactive=True) == [] and parts.store.tokens == {}


async def test_a_naive_expiry_is_refused_and_every_bad_field_is_named(parts: Parts) -> None:
    naive = (parts.clock.now() + timedelta(days=1)).replace(tzinfo=None)
    with pytest.raises(InvalidArgument) as caught:
        await parts.keeper.create(Role.VIEWER, "", naive, "local")
    assert fields(caught.value) == ["expires_at"] and "time zone" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        await parts.keeper.create(9, "\t", naive, "local")  # type: ignore[arg-type]
    assert fields(caught.value) == ["role", "description", "expires_at"]
    # At the limit, printable text of any script is fine.
    await parts.keeper.create(Role.VIEWER, "ü" * MAX_DESCRIPTION, None, "local")


async def test_a_store_failure_creates_nothing(parts: Parts) -> None:
    parts.store.failure = StoreError("database is down")
    with capture_logs() as logs:
        with pytest.raises(Unavailable) as caught:
            await parts.keeper.create(Role.ADMIN, "", None, "local")
    assert caught.value.message.startswith("the token was not created: the database is unavailable: ")
    assert "database is down" in caught.value.message
    assert parts.keeper.list(include_inactive=True) == []
    assert parts.store.tokens == {}
    assert not [e for e in logs if e["event"] == "API token created"]


async def test_a_store_failure_revokes_nothing(parts: Parts) -> None:
    token, whole = await parts.keeper.create(Role.ADMIN, "", None, "local")
    parts.store.failure = StoreError("database is down")
    with pytest.raises(Unavailable, match="not revoked"):
        await parts.keeper.revoke(token.token_id)
    assert parts.keeper.verify(whole) == token  # not acknowledged, so not in effect
    parts.store.failure = None
    assert (await parts.keeper.revoke(token.token_id)).revoked_at is not None


async def test_a_store_that_does_not_answer_is_unavailable() -> None:
    class Frozen(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.thawed = threading.Event()

        def save_token(self, token: ApiToken) -> None:
            self.thawed.wait(5)
            super().save_token(token)

    store, clock = Frozen(), FakeClock()
    writes = WriteBehind(store, clock, commit_timeout=0.05)
    keeper = TokenKeeper(store, writes, clock)
    await keeper.load()
    with pytest.raises(Unavailable, match=r"did not answer within 0\.05s"):
        await keeper.create(Role.ADMIN, "", None, "local")
    assert keeper.list(include_inactive=True) == []
    # The write lands later: a refresh then lists a token whose secret nobody was ever shown.
    store.thawed.set()
    await keeper.refresh()
    assert len(keeper.list()) == 1
    await writes.close(1.0)


async def test_only_the_hash_is_stored_and_no_secret_is_logged(parts: Parts) -> None:
    with capture_logs() as logs:
        token, whole = await parts.keeper.create(Role.ADMIN, "deploys", None, "token:0000000000000000")
        secret = whole.split("_", 2)[2]
        parts.keeper.verify(whole)
        parts.keeper.verify(whole + "x")
        await parts.keeper.refresh()
        parts.store.failure = StoreError("gone")
        await parts.keeper.refresh()
        parts.store.failure = None
        await parts.keeper.revoke(token.token_id)
    stored = parts.store.tokens[token.token_id]
    assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(parts.store.tokens) and secret not in repr(stored)
    assert secret not in repr(token) and secret not in repr(parts.keeper.list(include_inactive=True))
    assert any(e["event"] == "API token created" for e in logs)
    for entry in logs:
        assert secret not in repr(entry) and whole not in repr(entry), entry


async def test_refresh_takes_in_other_nodes_changes_and_survives_a_failure(parts: Parts) -> None:
    mine, whole = await parts.keeper.create(Role.OPERATOR, "", None, "local")
    # Another node, sharing the database, revokes it and creates one of its own.
    other, other_whole = await _made_elsewhere(parts)
    parts.store.tokens[mine.token_id] = _revoked(mine, parts.clock.now())
    assert parts.keeper.verify(whole) == mine and parts.keeper.verify(other_whole) is None
    await parts.keeper.refresh()
    assert parts.keeper.verify(whole) is None and parts.keeper.verify(other_whole) == other
    parts.store.failure = StoreError("database is down")
    with capture_logs() as logs:
        await parts.keeper.refresh()
    assert parts.keeper.verify(other_whole) == other  # the known ones stay
    assert [e["log_level"] for e in logs] == ["warning"]


async def test_a_keeper_that_never_loaded_refuses_everything_until_a_refresh_reads(parts: Parts) -> None:
    made, whole = await parts.keeper.create(Role.ADMIN, "", None, "local")
    store, clock = parts.store, parts.clock
    writes = WriteBehind(store, clock)
    fresh = TokenKeeper(store, writes, clock)
    store.failure = StoreError("database is down")
    with pytest.raises(StoreError):
        await fresh.load()
    await fresh.refresh()
    assert not fresh.loaded and fresh.verify(whole) is None
    with pytest.raises(Unavailable, match="not loaded"):
        await fresh.revoke(made.token_id)
    store.failure = None
    await fresh.refresh()
    assert fresh.loaded and fresh.verify(whole) == made
    await writes.close(1.0)


async def test_the_manager_loads_tokens_at_start_and_refreshes_them() -> None:
    store, runtime = MemoryStore(), FakeRuntime()
    seeding = WriteBehind(store)
    made, whole = await TokenKeeper(store, seeding).create(Role.VIEWER, "", None, "local")
    await seeding.close(1.0)
    manager = AgentManager(store, runtime, ManagerSettings(node="n1", monitoring_interval=0.02))
    await manager.start(discover=False)
    try:
        assert manager.tokens.verify(whole) == made
        store.tokens[made.token_id] = _revoked(made, datetime.now(UTC))

        async def revoked_here() -> None:
            while manager.tokens.verify(whole) is not None:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(revoked_here(), 2)
    finally:
        await manager.stop(stop_agents=False)


async def test_a_manager_starts_while_the_tokens_cannot_be_read() -> None:
    class NoTokens(MemoryStore):
        def load_tokens(self) -> list[ApiToken]:
            raise StoreError("PostgreSQL is unreachable")

    manager = AgentManager(NoTokens(), FakeRuntime(), ManagerSettings(node="n1", monitoring_interval=60))
    await manager.start(discover=False)
    try:
        assert not manager.tokens.loaded and manager.tokens.list() == []
    finally:
        await manager.stop(stop_agents=False)


async def _made_elsewhere(parts: Parts) -> tuple[ApiToken, str]:
    writes = WriteBehind(parts.store)
    made = await TokenKeeper(parts.store, writes, parts.clock).create(Role.ADMIN, "", None, "elsewhere")
    await writes.close(1.0)
    return made


def _revoked(token: ApiToken, at: datetime) -> ApiToken:
    return ApiToken(**{**vars(token), "revoked_at": at})
