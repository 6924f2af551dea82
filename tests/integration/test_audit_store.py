"""The audit trail in FleetStore: it lives in the shared PostgreSQL alone, never in a node's copy,
so appending, reading and pruning it need PostgreSQL (a private cluster, stopped at will); and
AuditTrail over it keeps what it could not write while PostgreSQL is away, and writes it once it
is back. The audit contract on SQLite and PostgreSQL themselves is in test_store.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pgcluster import PrivateCluster

from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.core.errors import StoreError, Unavailable
from opmasd.manager import AuditTrail
from opmasd.manager.persistence import WriteBehind
from opmasd.store import fleet
from opmasd.store.fleet import FleetStore
from opmasd.store.sql import SqlStore

NODE = "n1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def quick(cluster: PrivateCluster) -> str:
    """The cluster's URL with short bounds (2 s to connect, 1 s statements)."""
    return f"{cluster.url}?connect_timeout=2&options=-c%20statement_timeout%3D1000"


def record(n: int) -> AuditRecord:
    return AuditRecord(
        time=T0 + timedelta(seconds=n),
        actor="local",
        peer="unix:",
        entry_point="grpc",
        operation="StopAgent",
        target=f"agent-{n}",
        parameters={"agent_id": f"agent-{n}"},
        result="OK",
        node=NODE,
    )


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL is tried again at once after a failure: the tests bring it back themselves.
    monkeypatch.setattr(fleet, "RETRY_INITIAL", 0.0)
    monkeypatch.setattr(fleet, "RETRY_MAX", 0.0)


def test_the_audit_trail_is_in_postgres_only_and_needs_it(private_pg: PrivateCluster, tmp_path: Path) -> None:
    store = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    try:
        store.append_audit([record(0), record(1)])
        assert store.audit_records(AuditFilter()) == [record(1), record(0)]
        private_pg.stop()
        with pytest.raises(StoreError):
            store.append_audit([record(2)])
        with pytest.raises(StoreError):
            store.audit_records(AuditFilter())
        with pytest.raises(StoreError):
            store.prune_audit(1)
        private_pg.start()
        store.append_audit([record(3)])
        assert store.prune_audit(2) == 1
        assert store.audit_records(AuditFilter()) == [record(3), record(1)]
    finally:
        store.close()
    # Nothing of it in the node's copy; PostgreSQL has exactly what was written while it answered.
    copy = SqlStore.open(f"sqlite:///{tmp_path / 'copy.db'}")
    shared = SqlStore.open(private_pg.url)
    try:
        assert copy.audit_records(AuditFilter()) == []
        assert shared.audit_records(AuditFilter()) == [record(3), record(1)]
    finally:
        copy.close()
        shared.close()


async def test_the_trail_keeps_its_records_while_postgres_is_away(
    private_pg: PrivateCluster, tmp_path: Path
) -> None:
    store = FleetStore.open(quick(private_pg), NODE, tmp_path / "copy.db")
    writes = WriteBehind(store)
    trail = AuditTrail(store, writes, NODE)
    try:
        trail.record(record(0))
        await trail.flush()
        private_pg.stop()
        trail.record(record(1))
        for _ in range(3):
            trail.refused(
                "anonymous", "ipv4:192.0.2.7:5000", "rest", "StopAgent", "UNAUTHENTICATED", "no token"
            )
        await trail.flush()  # fails: kept
        assert trail.pending == 2
        with pytest.raises(Unavailable, match="the audit trail cannot be read: the database is unavailable"):
            await trail.query(AuditFilter())
        private_pg.start()
        listed = await trail.query(AuditFilter())
        assert [(r.target, r.peer, r.count) for r in listed] == [
            ("", "ipv4:192.0.2.7", 3),
            ("agent-1", "unix:", 1),
            ("agent-0", "unix:", 1),
        ]
        assert trail.pending == 0
    finally:
        await writes.close(5.0)
        store.close()
