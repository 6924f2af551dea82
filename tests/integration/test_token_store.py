"""API tokens in FleetStore: they live in the shared PostgreSQL alone, never in a node's copy, so
saving and loading them needs PostgreSQL (a private cluster, stopped at will). The token
contract on SQLite and PostgreSQL themselves is in test_store.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pgcluster import PrivateCluster

from opmasd.core.auth import ApiToken, Role
from opmasd.core.errors import StoreError
from opmasd.store import fleet
from opmasd.store.fleet import FleetStore
from opmasd.store.sql import SqlStore

NODE = "n1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def quick(cluster: PrivateCluster) -> str:
    """The cluster's URL with short bounds (2 s to connect, 1 s statements)."""
    return f"{cluster.url}?connect_timeout=2&options=-c%20statement_timeout%3D1000"


def token(token_id: str = "0123456789abcdef", **fields: object) -> ApiToken:
    made = ApiToken(token_id, Role.ADMIN, "ops", "cd" * 32, T0, "local", expires_at=T0 + timedelta(days=1))
    return dataclasses.replace(made, **fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL is tried again at once after a failure: the tests bring it back themselves.
    monkeypatch.setattr(fleet, "RETRY_INITIAL", 0.0)
    monkeypatch.setattr(fleet, "RETRY_MAX", 0.0)


def test_tokens_are_saved_in_postgres_only_and_need_it(private_pg: PrivateCluster, tmp_path: Path) -> None:
    store = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    try:
        store.save_token(token())
        assert store.load_tokens() == [token()]
        private_pg.stop()
        with pytest.raises(StoreError):
            store.save_token(token("1111111111111111"))
        with pytest.raises(StoreError):
            store.load_tokens()
        private_pg.start()
        revoked = token(revoked_at=T0 + timedelta(hours=1))
        store.save_token(revoked)
        assert store.load_tokens() == [revoked]
    finally:
        store.close()
    # Nothing of them in the node's copy; PostgreSQL has exactly what was saved while it answered.
    copy = SqlStore.open(f"sqlite:///{tmp_path / 'copy.db'}")
    shared = SqlStore.open(private_pg.url)
    try:
        assert copy.load_tokens() == []
        assert shared.load_tokens() == [revoked]
    finally:
        copy.close()
        shared.close()


def test_a_node_started_while_postgres_is_down_cannot_read_tokens_until_it_is_back(
    private_pg: PrivateCluster, tmp_path: Path
) -> None:
    first = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    first.save_token(token())
    first.close()
    private_pg.stop()
    store = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    try:
        assert store.load_agents() == []  # the node itself starts, from its copy
        with pytest.raises(StoreError):
            store.load_tokens()
        private_pg.start()
        assert store.load_tokens() == [token()]
    finally:
        store.close()
