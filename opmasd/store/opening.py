"""The store a configuration asks for: SQLite on its own, or PostgreSQL with this node's copy."""

from __future__ import annotations

from pathlib import Path

from opmasd.store.base import AgentStore
from opmasd.store.database import is_postgres_url
from opmasd.store.fleet import FleetStore
from opmasd.store.sql import SqlStore

# The node's own copy of its agents, beside the other state (store.fleet says why).
NODE_COPY = "node-copy.db"


def open_store(url: str, *, node: str, state_dir: Path, pool_size: int = 5) -> AgentStore:
    """SqlStore for a SQLite URL; FleetStore for PostgreSQL, which starts even while PostgreSQL
    is unreachable. ValueError for a URL not accepted; StoreError when the store cannot open."""
    if is_postgres_url(url):
        return FleetStore.open(url, node, state_dir / NODE_COPY, pool_size=pool_size)
    return SqlStore.open(url, pool_size=pool_size)
