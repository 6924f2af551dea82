"""The store, on real databases: SQLite in a temporary file and the PostgreSQL server at
OPMAS_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test).

The contract tests run against MemoryStore as well, so the in-memory store the manager's unit
tests use cannot drift from the real ones. Each PostgreSQL test gets a schema of its own,
dropped afterwards; an unreachable server fails the test rather than skipping it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import peewee
import psycopg2  # type: ignore[import-untyped]
import pytest

from opmasd.core.audit import MAX_MESSAGE, MAX_PARAMETERS_BYTES, MAX_TARGET, AuditFilter, AuditRecord
from opmasd.core.auth import ApiToken, Role
from opmasd.core.errors import StoreError, StoreRejected
from opmasd.core.model import (
    AgentRecord,
    AgentSource,
    AgentSpec,
    AgentState,
    DesiredState,
    ExitInfo,
    ResourceLimits,
    RestartPolicy,
    RuntimeKind,
    Transition,
)
from opmasd.store import migrations, models
from opmasd.store.base import AgentStore
from opmasd.store.database import database_from_url
from opmasd.store.migrations import LATEST_VERSION
from opmasd.store.models import AgentRow, ApiTokenRow, AuditRow, SchemaVersion, TransitionRow
from opmasd.store.sql import SqlStore
from opmasd.testing.memory_store import MemoryStore

POSTGRES_URL = os.environ.get("OPMAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IST = timezone(timedelta(hours=5, minutes=30))


# -- backends -----------------------------------------------------------------------------------


@dataclass
class Backend:
    """A real database for one test: the store's URL and a side door for raw SQL."""

    name: str
    url: str
    raw: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]
    # column name -> nullable, of a table as it exists in the database
    columns: Callable[[str], dict[str, bool]]


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "state" / "opmas.db"

    def raw(statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            return conn.execute(statement, params).fetchall()

    def columns(table: str) -> dict[str, bool]:
        return {row[1]: not row[3] for row in raw(f"PRAGMA table_info({table})", ())}

    return Backend("sqlite", f"sqlite://{path}", raw, columns)


@pytest.fixture
def postgres_backend() -> Iterator[Backend]:
    try:
        admin = psycopg2.connect(POSTGRES_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({str(exc).strip()}). Start it, or point "
            "OPMAS_TEST_POSTGRES_URL at a server where the user may create schemas.",
            pytrace=False,
        )
    admin.autocommit = True
    schema = f"opmas_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")

    def raw(statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with admin.cursor() as cur:
            cur.execute(f"SET search_path TO {schema}")
            cur.execute(statement, params)
            rows: list[tuple[Any, ...]] = cur.fetchall() if cur.description else []
            return rows

    def columns(table: str) -> dict[str, bool]:
        rows = raw(
            "SELECT column_name, is_nullable FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s",
            (schema, table),
        )
        return {name: nullable == "YES" for name, nullable in rows}

    separator = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{separator}schema={schema}&application_name={schema}"
    try:
        yield Backend("postgres", url, raw, columns)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


SQL_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=SQL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    result: Backend = request.getfixturevalue(f"{request.param}_backend")
    return result


@pytest.fixture
def open_store() -> Iterator[Callable[[str], SqlStore]]:
    """SqlStore.open, with every store it opened closed at the end of the test."""
    opened: list[SqlStore] = []

    def open_(url: str) -> SqlStore:
        store = SqlStore.open(url)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(params=["memory", *SQL_BACKENDS])
def store(request: pytest.FixtureRequest, open_store: Callable[[str], SqlStore]) -> AgentStore:
    if request.param == "memory":
        return MemoryStore()
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return open_store(backend.url)


# -- records ------------------------------------------------------------------------------------


def full_record(agent_id: str = "agent-full") -> AgentRecord:
    """Every field set to something other than its default; datetimes not in UTC."""
    t0 = datetime(2025, 3, 30, 1, 59, 58, 123456, tzinfo=IST)
    return AgentRecord(
        agent_id=agent_id,
        spec=AgentSpec(
            name="snmp-poller",
            command=("/usr/bin/python3", "-m", "opmas_agents.snmp", "--verbose"),
            type="collector",
            version="1.2.3",
            description="polls — ünïcode",
            working_directory="/var/lib/opmas/snmp",
            environment=(("A", "1"), ("EMPTY", ""), ("PATH", "/usr/bin:/bin")),
            restart_policy=RestartPolicy.ALWAYS,
            stop_timeout=2.5,
            heartbeat_interval=7.25,
            resources=ResourceLimits(
                memory_max_bytes=256 * 1024 * 1024, cpu_quota_percent=50.5, tasks_max=64, open_files_max=1024
            ),
            runtime=RuntimeKind.SYSTEMD,
            autostart=True,
            restart_on_inactive=True,
        ),
        source=AgentSource.DISCOVERED,
        manifest_path="/usr/lib/opmas/agents/snmp/agent.yaml",
        node="node-7",
        created_at=t0,
        updated_at=t0 + timedelta(seconds=1),
        deleted=False,
        desired=DesiredState.RUNNING,
        state=AgentState.BACKOFF,
        state_reason="exited with code 3",
        state_changed_at=t0 + timedelta(seconds=2),
        pid=4242,
        pid_start_time=1743283798.37,
        started_at=t0 + timedelta(seconds=3),
        restart_count=5,
        consecutive_failures=2,
        last_exit=ExitInfo(exit_code=3, signal=None, time=t0 + timedelta(seconds=4)),
        last_heartbeat=t0 + timedelta(seconds=5),
        next_restart_at=t0 + timedelta(seconds=6),
    )


def minimal_record(agent_id: str = "agent-min") -> AgentRecord:
    return AgentRecord(agent_id=agent_id, spec=AgentSpec(name=agent_id, command=("true",)))


def transition(agent_id: str, n: int) -> Transition:
    states = list(AgentState)
    return Transition(
        agent_id=agent_id,
        previous=states[n % len(states)],
        state=states[(n + 1) % len(states)],
        reason=f"step {n}",
        at=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=n),
    )


def api_token(token_id: str = "0123456789abcdef", **fields: Any) -> ApiToken:
    """A token with every field set; datetimes not in UTC."""
    t0 = datetime(2025, 3, 30, 1, 59, 58, 123456, tzinfo=IST)
    values: dict[str, Any] = {
        "token_id": token_id,
        "role": Role.OPERATOR,
        "description": "ci deploys — ünïcode",
        "secret_hash": "ab" * 32,
        "created_at": t0,
        "created_by": "token:fedcba9876543210",
        "expires_at": t0 + timedelta(days=30),
        "revoked_at": t0 + timedelta(days=1),
    }
    values.update(fields)
    return ApiToken(**values)


def audit_record(n: int, **fields: Any) -> AuditRecord:
    """An audit record with every field set; its time not in UTC."""
    values: dict[str, Any] = {
        "time": datetime(2025, 3, 30, 1, 59, 58, 123456, tzinfo=IST) + timedelta(seconds=n),
        "actor": "local" if n % 2 else "token:0123456789abcdef",
        "peer": "ipv6:[::1]" if n % 2 else "unix:",
        "entry_point": "grpc",
        "operation": "StopAgent",
        "target": f"agent-{n % 3}",
        "parameters": {
            "agent_id": f"agent-{n % 3}",
            "timeout": 2.5,
            "labels": {"b": "ü", "a": [1, None, True]},
        },
        "result": "OK" if n % 4 else "NOT_FOUND",
        "message": "" if n % 4 else "agent 'x' not found — ünïcode",
        "node": "node-7",
        "count": n + 1,
    }
    values.update(fields)
    return AuditRecord(**values)


# -- the contract: MemoryStore, SQLite, PostgreSQL ----------------------------------------------


def test_full_record_round_trips(store: AgentStore) -> None:
    record = full_record()
    store.save_agent(record)
    [loaded] = store.load_agents()
    assert loaded == record
    assert loaded.last_exit is not None
    for value in (loaded.created_at, loaded.started_at, loaded.last_exit.time, loaded.next_restart_at):
        assert value is not None and value.tzinfo is not None


def test_minimal_record_round_trips(store: AgentStore) -> None:
    record = minimal_record()
    store.save_agent(record)
    assert store.load_agents() == [record]
    assert store.load_agents()[0].last_exit is None


@pytest.mark.parametrize(
    "exit_info",
    [ExitInfo(None, None), ExitInfo(None, 9), ExitInfo(0, None)],
    ids=["adopted-unknown", "signal", "clean"],
)
def test_exit_info_round_trips(store: AgentStore, exit_info: ExitInfo) -> None:
    record = dataclasses.replace(minimal_record(), last_exit=exit_info)
    store.save_agent(record)
    assert store.load_agents()[0].last_exit == exit_info


def test_save_replaces_the_row(store: AgentStore) -> None:
    record = full_record()
    store.save_agent(record)
    changed = dataclasses.replace(
        record,
        spec=dataclasses.replace(record.spec, command=("sleep", "1"), environment=()),
        state=AgentState.RUNNING,
        pid=None,
        pid_start_time=None,
        last_exit=None,
        next_restart_at=None,
    )
    store.save_agent(changed)
    assert store.load_agents() == [changed]


def test_tombstones_are_loaded_and_agents_come_sorted(store: AgentStore) -> None:
    store.save_agent(minimal_record("b"))
    store.save_agent(dataclasses.replace(minimal_record("a"), deleted=True))
    store.save_agent(minimal_record("c"))
    loaded = store.load_agents()
    assert [r.agent_id for r in loaded] == ["a", "b", "c"]
    assert [r.deleted for r in loaded] == [True, False, False]


def test_record_transition_saves_the_row_and_appends(store: AgentStore) -> None:
    record = minimal_record()
    store.save_agent(record)
    running = dataclasses.replace(record, state=AgentState.RUNNING, state_reason="started")
    step = Transition(record.agent_id, AgentState.STOPPED, AgentState.RUNNING, "started", record.created_at)
    store.record_transition(running, step)
    assert store.load_agents() == [running]
    assert store.transitions(record.agent_id) == [step]


def test_record_transition_creates_a_new_agent_row(store: AgentStore) -> None:
    record = minimal_record()
    store.record_transition(record, transition(record.agent_id, 0))
    assert store.load_agents() == [record]
    assert len(store.transitions(record.agent_id)) == 1


def test_transitions_are_newest_first_limited_and_per_agent(store: AgentStore) -> None:
    a, b = minimal_record("a"), minimal_record("b")
    for n in range(5):
        store.record_transition(a, transition("a", n))
        store.record_transition(b, transition("b", 100 + n))
    assert [t.reason for t in store.transitions("a")] == [f"step {n}" for n in (4, 3, 2, 1, 0)]
    assert store.transitions("a", limit=2) == [transition("a", 4), transition("a", 3)]
    assert store.transitions("a", limit=0) == []
    assert store.transitions("nobody") == []
    with pytest.raises(ValueError, match="limit"):
        store.transitions("a", limit=-1)


def test_transition_order_is_append_order_not_timestamp(store: AgentStore) -> None:
    # A clock stepping back must not reorder history.
    record = minimal_record()
    late, early = transition(record.agent_id, 50), transition(record.agent_id, 1)
    store.record_transition(record, late)
    store.record_transition(record, early)
    assert store.transitions(record.agent_id) == [early, late]


def test_prune_keeps_the_newest_of_each_agent(store: AgentStore) -> None:
    for agent_id, count in (("a", 5), ("b", 2), ("c", 0)):
        store.save_agent(minimal_record(agent_id))
        for n in range(count):
            store.record_transition(minimal_record(agent_id), transition(agent_id, n))
    assert store.prune_transitions(3) == 2
    assert [t.reason for t in store.transitions("a")] == ["step 4", "step 3", "step 2"]
    assert len(store.transitions("b")) == 2
    assert store.prune_transitions(3) == 0
    assert store.prune_transitions(0) == 5
    assert store.transitions("a") == store.transitions("b") == []
    with pytest.raises(ValueError, match="keep_per_agent"):
        store.prune_transitions(-1)


def test_write_batch_saves_rows_and_appends_transitions_in_order(store: AgentStore) -> None:
    store.save_agent(minimal_record("a"))
    changed = minimal_record("a")
    changed.state = AgentState.RUNNING
    store.write_batch(
        [changed, minimal_record("b")], [transition("a", 0), transition("b", 1), transition("a", 2)]
    )
    by_id = {rec.agent_id: rec for rec in store.load_agents()}
    assert set(by_id) == {"a", "b"} and by_id["a"].state is AgentState.RUNNING
    assert [t.reason for t in store.transitions("a")] == [
        transition("a", 2).reason,
        transition("a", 0).reason,
    ]
    store.write_batch([], [])  # nothing to do is fine


def test_heartbeats_are_saved_in_one_batch(store: AgentStore) -> None:
    store.save_agent(minimal_record("a"))
    store.save_agent(minimal_record("b"))
    seen = datetime(2026, 11, 24, 8, 0, 1, 500000, tzinfo=UTC)
    store.save_heartbeats({"a": seen, "ghost": seen})
    by_id = {rec.agent_id: rec for rec in store.load_agents()}
    assert by_id["a"].last_heartbeat == seen
    assert by_id["b"].last_heartbeat is None
    assert "ghost" not in by_id


def test_transition_of_another_agent_is_refused(store: AgentStore) -> None:
    with pytest.raises(ValueError, match=r"'b'.*'a'"):
        store.record_transition(minimal_record("a"), transition("b", 0))
    assert store.load_agents() == []


def test_callers_cannot_change_stored_state(store: AgentStore) -> None:
    record = minimal_record()
    store.save_agent(record)
    record.state = AgentState.ERROR
    loaded = store.load_agents()[0]
    loaded.state = AgentState.RUNNING
    assert store.load_agents()[0].state is AgentState.STOPPED


def test_a_closed_store_refuses_calls(store: AgentStore) -> None:
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        store.load_agents()
    with pytest.raises(StoreError, match="closed"):
        store.save_agent(minimal_record())


def test_tokens_round_trip(store: AgentStore) -> None:
    assert store.load_tokens() == []
    full = api_token("0123456789abcdef")
    bare = api_token("fedcba9876543210", role=Role.VIEWER, description="", expires_at=None, revoked_at=None)
    store.save_token(full)
    store.save_token(bare)
    assert store.load_tokens() == [full, bare]
    assert store.load_tokens()[0].role is Role.OPERATOR


def test_saving_a_token_again_replaces_its_row(store: AgentStore) -> None:
    token = api_token(revoked_at=None)
    store.save_token(token)
    store.save_token(api_token("aaaaaaaaaaaaaaaa"))
    revoked = dataclasses.replace(token, revoked_at=datetime(2026, 1, 1, tzinfo=UTC))
    store.save_token(revoked)
    assert {t.token_id: t for t in store.load_tokens()}[token.token_id] == revoked
    assert len(store.load_tokens()) == 2


def test_audit_records_round_trip_newest_first(store: AgentStore) -> None:
    assert store.audit_records(AuditFilter()) == []
    store.append_audit([])
    store.append_audit([audit_record(n) for n in range(5)])
    store.append_audit([audit_record(n) for n in range(5, 7)])
    listed = store.audit_records(AuditFilter())
    assert listed == [audit_record(n) for n in reversed(range(7))]
    ids = [r.id for r in listed]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(ids, key=lambda i: i or 0, reverse=True)
    assert len(set(ids)) == 7
    assert listed[-1].parameters == {
        "agent_id": "agent-0",
        "timeout": 2.5,
        "labels": {"b": "ü", "a": [1, None, True]},
    }


def test_audit_records_are_filtered_and_limited(store: AgentStore) -> None:
    store.append_audit([audit_record(n) for n in range(9)])
    newest = store.audit_records(AuditFilter(limit=1000))
    id_of = {r.count - 1: r.id for r in newest}  # count is n + 1

    def ns(**query: Any) -> list[int]:
        return [r.count - 1 for r in store.audit_records(AuditFilter(**query))]

    assert ns(target="agent-1") == [7, 4, 1]
    assert ns(actor="local") == [7, 5, 3, 1]
    assert ns(actor="local", target="agent-1") == [7, 1]
    assert ns(since=audit_record(6).time) == [8, 7, 6]
    assert ns(since=audit_record(6).time.astimezone(UTC)) == [8, 7, 6]
    assert ns(before_id=id_of[3]) == [2, 1, 0]
    assert ns(before_id=id_of[8], limit=2) == [7, 6]
    assert ns(limit=3) == [8, 7, 6]
    assert ns(limit=0) == []
    assert ns(target="nobody") == []


def test_pruning_audit_records_keeps_the_newest(store: AgentStore) -> None:
    assert store.prune_audit(10) == 0
    store.append_audit([audit_record(n) for n in range(7)])
    assert store.prune_audit(3) == 4
    assert [r.count for r in store.audit_records(AuditFilter())] == [7, 6, 5]
    assert store.prune_audit(3) == 0
    assert store.prune_audit(1) == 2
    [kept] = store.audit_records(AuditFilter())
    store.append_audit([audit_record(9)])
    newest = store.audit_records(AuditFilter())
    assert [r.count for r in newest] == [10, 7] and (newest[0].id or 0) > (kept.id or 0)
    with pytest.raises(ValueError, match="negative"):
        store.prune_audit(-1)
    assert store.prune_audit(0) == 2
    assert store.audit_records(AuditFilter()) == []


def test_a_store_that_failed_refuses_audit_calls(store: AgentStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.append_audit([audit_record(0)])
    with pytest.raises(StoreError, match="closed"):
        store.audit_records(AuditFilter())
    with pytest.raises(StoreError, match="closed"):
        store.prune_audit(1)


# -- SQL only: SQLite and PostgreSQL ------------------------------------------------------------


def test_long_audit_fields_are_cut_to_their_columns(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    store = open_store(backend.url)
    widths = {"actor": 160, "peer": 160, "entry_point": 16, "operation": 64, "result": 32, "node": 255}
    long = audit_record(
        0,
        target="t" * 10_000,
        message="m" * 10_000,
        count=10**12,  # past an INTEGER column: kept at its largest
        **{name: name[0] * 10_000 for name in widths},
    )
    # NUL and lone surrogates, which neither database stores, are replaced.
    odd = audit_record(1, actor="a\x00b", target="x\ud800y", message="\udfff")
    store.append_audit([long, odd])
    got_odd, got_long = store.audit_records(AuditFilter())
    assert got_long.time == long.time and got_long.time.tzinfo is UTC
    assert len(got_long.target) == MAX_TARGET and len(got_long.message) == MAX_MESSAGE
    assert {name: len(getattr(got_long, name)) for name in widths} == widths
    assert got_long.count == 2**31 - 1
    assert (got_odd.actor, got_odd.target, got_odd.message) == ("a\ufffdb", "x\ufffdy", "\ufffd")


def test_audit_parameters_are_bounded_compact_sorted_json(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    store = open_store(backend.url)
    loop: dict[str, Any] = {}
    loop["loop"] = loop
    records = [
        audit_record(0, parameters={"z": 1, "a": {"y": 2, "b": [3]}}),
        audit_record(1, parameters={"a": "x" * 100, "big": "y" * 10 * MAX_PARAMETERS_BYTES, "c": 3}),
        audit_record(2, parameters={f"k{i:04}": "v" * 50 for i in range(1000)}),
        audit_record(3, parameters={"when": datetime(2026, 1, 1, tzinfo=UTC), "cycle": loop, "n": 1}),
        audit_record(4, parameters={}),
    ]
    store.append_audit(records)
    raw = [text for (text,) in backend.raw("SELECT parameters FROM audit_records ORDER BY id", ())]
    assert raw[0] == '{"a":{"b":[3],"y":2},"z":1}'
    for text in raw:
        assert len(text.encode()) <= MAX_PARAMETERS_BYTES
        json.loads(text)  # valid
    loaded = {r.count - 1: r.parameters for r in store.audit_records(AuditFilter())}
    assert loaded[1] == {"truncated": True, "a": "x" * 100, "c": 3}
    assert loaded[2]["truncated"] is True and "k0000" in loaded[2] and len(loaded[2]) > 10
    assert loaded[3] == {"truncated": True, "n": 1, "when": "2026-01-01 00:00:00+00:00"}
    assert loaded[4] == {}


def test_the_audit_table_has_its_indexes(backend: Backend, open_store: Callable[[str], SqlStore]) -> None:
    open_store(backend.url)
    if backend.name == "sqlite":
        names = [name for (_, name, *_) in backend.raw("PRAGMA index_list(audit_records)", ())]
        indexed = {tuple(row[2] for row in backend.raw(f"PRAGMA index_info({n})", ())) for n in names}
    else:
        rows = backend.raw(
            "SELECT indexdef FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = 'audit_records'",
            (),
        )
        indexed = {
            tuple(c.strip().strip('"') for c in d.split("(", 1)[1].rstrip(")").split(",")) for (d,) in rows
        }
    assert {("time",), ("target", "id"), ("actor", "id")} <= indexed


def test_a_version_2_database_gains_the_audit_table_and_keeps_its_data(
    backend: Backend, open_store: Callable[[str], SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
        patched.setattr(migrations, "LATEST_VERSION", 2)
        old = open_store(backend.url)
        assert old.schema_version == 2
        old.record_transition(full_record(), transition("agent-full", 0))
        old.save_token(api_token())
        old.close()
    assert "audit_records" not in _tables(backend)
    store = open_store(backend.url)
    assert store.schema_version == LATEST_VERSION == 3
    assert "audit_records" in _tables(backend)
    assert store.load_agents() == [full_record()]
    assert store.transitions("agent-full") == [transition("agent-full", 0)]
    assert store.load_tokens() == [api_token()]
    assert store.audit_records(AuditFilter()) == []
    store.append_audit([audit_record(0)])
    assert store.audit_records(AuditFilter()) == [audit_record(0)]


def test_only_the_secret_hash_is_in_the_token_table(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    store = open_store(backend.url)
    store.save_token(api_token(revoked_at=None))
    [loaded] = store.load_tokens()
    assert (
        loaded.created_at.tzinfo is UTC and loaded.expires_at is not None and loaded.expires_at.tzinfo is UTC
    )
    assert backend.raw("SELECT token_id, role, secret_hash, revoked_at FROM api_tokens", ()) == [
        ("0123456789abcdef", 2, "ab" * 32, None)
    ]


def test_a_token_row_the_database_refuses_is_a_store_rejection(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    store = open_store(backend.url)
    with pytest.raises(StoreRejected):
        store.save_token(api_token(description=None))  # NOT NULL
    if backend.name == "postgres":  # SQLite enforces neither a varchar's length nor refuses NUL
        with pytest.raises(StoreRejected):
            store.save_token(api_token(description="d" * 257))
        with pytest.raises(StoreRejected):
            store.save_token(api_token(description="a\x00b"))
    assert store.load_tokens() == []


def test_a_token_row_of_an_unknown_role_is_left_out(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    store = open_store(backend.url)
    store.save_token(api_token("0123456789abcdef"))
    store.save_token(api_token("1111111111111111"))
    backend.raw("UPDATE api_tokens SET role = 9 WHERE token_id = '1111111111111111'", ())
    assert [t.token_id for t in store.load_tokens()] == ["0123456789abcdef"]


def test_a_version_1_database_gains_the_token_table_and_keeps_its_agents(
    backend: Backend, open_store: Callable[[str], SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
        patched.setattr(migrations, "LATEST_VERSION", 1)
        old = open_store(backend.url)
        assert old.schema_version == 1
        old.record_transition(full_record(), transition("agent-full", 0))
        old.close()
    assert "api_tokens" not in _tables(backend)
    store = open_store(backend.url)
    assert store.schema_version == LATEST_VERSION
    assert "api_tokens" in _tables(backend)
    assert store.load_agents() == [full_record()]
    assert store.transitions("agent-full") == [transition("agent-full", 0)]
    assert store.load_tokens() == []
    store.save_token(api_token())
    assert store.load_tokens() == [api_token()]


def _tables(backend: Backend) -> set[str]:
    if backend.name == "sqlite":
        return {name for (name,) in backend.raw("SELECT name FROM sqlite_master WHERE type = 'table'", ())}
    return {
        name
        for (name,) in backend.raw("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()", ())
    }


def test_datetimes_come_back_in_utc(backend: Backend, open_store: Callable[[str], SqlStore]) -> None:
    store = open_store(backend.url)
    store.record_transition(full_record(), transition("agent-full", 0))
    [loaded] = store.load_agents()
    assert loaded.created_at.tzinfo is UTC
    assert loaded.created_at == full_record().created_at
    assert store.transitions("agent-full")[0].at.tzinfo is UTC


def test_schema_version_is_recorded(backend: Backend, open_store: Callable[[str], SqlStore]) -> None:
    store = open_store(backend.url)
    assert store.schema_version == LATEST_VERSION
    assert backend.raw("SELECT version FROM schema_version ORDER BY version", ()) == [
        (v,) for v in range(1, LATEST_VERSION + 1)
    ]


def test_migrations_build_what_the_models_describe(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    # Migrations are frozen copies; this catches a model changed without a migration.
    open_store(backend.url)
    for model in (AgentRow, TransitionRow, ApiTokenRow, AuditRow, SchemaVersion):
        expected = {f.column_name: bool(f.null) for f in model._meta.sorted_fields}
        assert backend.columns(model._meta.table_name) == expected, model.__name__


def test_reopening_keeps_data_and_does_not_migrate_again(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    first = open_store(backend.url)
    first.record_transition(full_record(), transition("agent-full", 0))
    first.close()
    second = open_store(backend.url)
    assert second.load_agents() == [full_record()]
    assert second.transitions("agent-full") == [transition("agent-full", 0)]
    assert backend.raw("SELECT COUNT(*) FROM schema_version", ()) == [(LATEST_VERSION,)]


def test_two_stores_open_at_once_each_use_their_own_database(
    backend: Backend, open_store: Callable[[str], SqlStore], tmp_path: Path
) -> None:
    # The models share one DatabaseProxy: every call must point it at its own store.
    shared = open_store(backend.url)
    other = open_store(f"sqlite://{tmp_path / 'other.db'}")
    shared.save_agent(minimal_record("x"))
    other.save_agent(minimal_record("y"))
    assert [r.agent_id for r in shared.load_agents()] == ["x"]
    assert [r.agent_id for r in other.load_agents()] == ["y"]


def test_a_newer_schema_is_refused(backend: Backend, open_store: Callable[[str], SqlStore]) -> None:
    open_store(backend.url).close()
    backend.raw("INSERT INTO schema_version (version) VALUES (999)", ())
    with pytest.raises(StoreError) as caught:
        open_store(backend.url)
    assert f"database schema version 999 is newer than this opmasd (knows {LATEST_VERSION})" in str(
        caught.value
    )


def test_failing_transition_insert_rolls_back_the_agent_row(
    backend: Backend, open_store: Callable[[str], SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(backend.url)
    record = minimal_record()
    store.save_agent(record)

    def broken_transition(t: Transition) -> dict[str, Any]:
        return {**to_row(t), "reason": None}  # NOT NULL: the database itself refuses it

    to_row = models.transition_to_row
    monkeypatch.setattr("opmasd.store.sql.transition_to_row", broken_transition)
    running = dataclasses.replace(record, state=AgentState.RUNNING)
    with pytest.raises(StoreError, match="record transition of agent-min"):
        store.record_transition(running, transition(record.agent_id, 0))
    assert store.load_agents() == [record]
    assert store.transitions(record.agent_id) == []


def test_failing_agent_row_leaves_no_transition(
    backend: Backend, open_store: Callable[[str], SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(backend.url)
    to_row = models.agent_to_row
    monkeypatch.setattr("opmasd.store.sql.agent_to_row", lambda r: {**to_row(r), "name": None})
    with pytest.raises(StoreError, match="record transition of agent-min"):
        store.record_transition(minimal_record(), transition("agent-min", 0))
    monkeypatch.undo()
    assert store.load_agents() == []
    assert backend.raw("SELECT COUNT(*) FROM agent_transitions", ()) == [(0,)]


def test_an_unreadable_row_is_a_store_error(backend: Backend, open_store: Callable[[str], SqlStore]) -> None:
    store = open_store(backend.url)
    store.save_agent(minimal_record())
    backend.raw("UPDATE agents SET state = 'hibernating'", ())
    with pytest.raises(StoreError, match=r"agent 'agent-min' cannot be read.*hibernating"):
        store.load_agents()


def test_sqlite_runs_in_wal_mode_and_creates_its_directory(
    sqlite_backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    open_store(sqlite_backend.url)
    assert sqlite_backend.raw("PRAGMA journal_mode", ()) == [("wal",)]


def test_sqlite_in_memory(open_store: Callable[[str], SqlStore]) -> None:
    store = open_store("sqlite:///:memory:")
    record = minimal_record()
    store.save_agent(record)
    assert store.load_agents() == [record]


# -- PostgreSQL only ----------------------------------------------------------------------------


def _drop_store_connections(backend: Backend) -> int:
    """What a server restart does to the store: its connections die under it."""
    application_name = backend.url.rsplit("application_name=", 1)[1]
    rows = backend.raw(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    )
    return len(rows)


@pytest.mark.postgres
def test_postgres_replaces_connections_that_died_while_idle(
    postgres_backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    # The pool checks a connection (a round trip) when it hands it out.
    store = open_store(postgres_backend.url)
    record = minimal_record()
    store.save_agent(record)
    assert _drop_store_connections(postgres_backend) == 1
    assert store.load_agents() == [record]
    assert _drop_store_connections(postgres_backend) == 1
    store.record_transition(record, transition(record.agent_id, 0))
    assert len(store.transitions("agent-min")) == 1


def _die_once_while_building_the_row(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Kill the store's connection in the middle of its next save (inside the transaction)."""
    kills: list[int] = []
    to_row = models.agent_to_row

    def dying(record: AgentRecord) -> dict[str, Any]:
        if not kills:
            kills.append(_drop_store_connections(backend))
        return to_row(record)

    monkeypatch.setattr("opmasd.store.sql.agent_to_row", dying)
    return kills


@pytest.mark.postgres
def test_postgres_retries_an_idempotent_call_once_on_a_new_connection(
    postgres_backend: Backend, open_store: Callable[[str], SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(postgres_backend.url)
    kills = _die_once_while_building_the_row(postgres_backend, monkeypatch)
    record = minimal_record()
    store.save_agent(record)
    assert kills == [1]
    assert store.load_agents() == [record]


@pytest.mark.postgres
def test_postgres_does_not_repeat_a_transition_whose_outcome_is_unknown(
    postgres_backend: Backend, open_store: Callable[[str], SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(postgres_backend.url)
    kills = _die_once_while_building_the_row(postgres_backend, monkeypatch)
    with pytest.raises(StoreError, match="record transition of agent-min"):
        store.record_transition(minimal_record(), transition("agent-min", 0))
    assert kills == [1]
    # The server rolled the transaction back; the next call gets a working connection.
    assert store.load_agents() == []
    assert store.transitions("agent-min") == []


@pytest.mark.postgres
def test_postgres_sqlalchemy_style_url(
    postgres_backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    url = postgres_backend.url.replace("postgresql://", "postgresql+asyncpg://", 1)
    assert url.startswith("postgresql+asyncpg://"), "OPMAS_TEST_POSTGRES_URL should be postgresql://"
    open_store(url).save_agent(minimal_record())
    assert postgres_backend.raw("SELECT agent_id FROM agents", ()) == [("agent-min",)]


# -- opening: URLs and unreachable servers ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://root@localhost/opmas", "'mysql'"),
        ("redis://localhost", "'redis'"),
        ("/var/lib/opmas/opmas.db", "(none)"),
        ("", "(none)"),
        ("sqlite://relative.db", "sqlite:///absolute/path.db"),
        ("sqlite:///", "no file name"),
        ("postgresql://u@host:5432", "no database name"),
        ("postgresql://u@host:port/db", "bad port"),
        ("postgresql://u@host/db?schema=x;drop", "bad schema"),
    ],
)
def test_bad_urls_are_refused_by_name(url: str, named: str) -> None:
    with pytest.raises(ValueError) as caught:
        SqlStore.open(url)
    assert named in str(caught.value)


def test_unknown_scheme_message_lists_what_is_accepted() -> None:
    with pytest.raises(ValueError, match=r"mysql.*sqlite:///absolute/path\.db.*postgresql\+asyncpg"):
        SqlStore.open("mysql://localhost/x")


def test_passwords_stay_out_of_messages() -> None:
    with pytest.raises(ValueError) as caught:
        SqlStore.open("postgresql://opmas:s3cret@db.example:5432")
    assert "s3cret" not in str(caught.value) and "opmas:***@" in str(caught.value)


@pytest.mark.parametrize(
    "scheme", ["postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2", "POSTGRESQL"]
)
def test_postgres_url_spellings(scheme: str) -> None:
    db = database_from_url(f"{scheme}://u:p%40ss@db.example:6432/opmas?sslmode=require&schema=s1")
    assert isinstance(db, peewee.PostgresqlDatabase)
    assert db.database == "opmas"
    params = db.connect_params
    assert (params["user"], params["password"], params["host"], params["port"]) == (
        "u",
        "p@ss",
        "db.example",
        6432,
    )
    assert params["sslmode"] == "require"
    assert params["options"] == "-c search_path=s1 -c statement_timeout=10000"
    # Every wait bounded, unless the URL says otherwise.
    assert (params["connect_timeout"], params["keepalives"], params["keepalives_idle"]) == (10, 1, 10)
    own = database_from_url("postgresql://u@h/db?options=-c%20statement_timeout%3D500&keepalives_idle=3")
    assert own.connect_params["options"] == "-c statement_timeout=500"
    assert own.connect_params["keepalives_idle"] == "3"


def test_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreError, match=r"open and migrate the database failed \(postgresql://"):
        SqlStore.open("postgresql://opmas:pw@127.0.0.1:1/opmas?connect_timeout=2")


def test_a_row_the_database_refuses_is_a_store_rejection_not_a_driver_error(
    backend: Backend, open_store: Callable[[str], SqlStore]
) -> None:
    """write_batch runs on the raw cursor: its driver errors must still become the store's."""
    store = open_store(backend.url)
    store.write_batch([minimal_record("fine")], [])
    orphan = transition("no-such-agent", 1)  # its agent has no row: a foreign-key violation
    with pytest.raises(StoreRejected):
        store.write_batch([], [orphan])
    if backend.name == "postgres":
        too_long = dataclasses.replace(
            minimal_record("long"), spec=AgentSpec(name="x", command=("a",), type="t" * 300)
        )
        with pytest.raises(StoreRejected):
            store.write_batch([too_long], [])
        nul = dataclasses.replace(
            minimal_record("nul"), spec=AgentSpec(name="x", command=("a",), type="a\x00b")
        )
        with pytest.raises(StoreRejected):
            store.write_batch([nul], [])
    # The store is fine afterwards: the refused batches left nothing behind.
    store.write_batch([minimal_record("after")], [transition("after", 1)])
    assert {r.agent_id for r in store.load_agents()} == {"fine", "after"}
