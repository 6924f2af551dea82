"""SqlStore: the AgentStore on SQLite or PostgreSQL, through peewee.

Open it from `database.url`:

    sqlite:///var/lib/opmas/opmas.db          a file (absolute path; its directory is created)
    sqlite:///:memory:                         a private in-memory database (tests)
    postgresql://user:pass@host:5432/opmas     PostgreSQL through psycopg2; also postgres://,
                                               and the original design's SQLAlchemy-style
                                               postgresql+asyncpg:// and postgresql+psycopg2://

PostgreSQL URLs take libpq connection parameters as query parameters (`?sslmode=require&
connect_timeout=5`, `options=-c%20statement_timeout%3D5000`, `host=/run/postgresql` for a
unix socket), plus one of our own: `schema=NAME` puts the tables in that (existing) schema by
setting the connection's search_path, which is how the tests isolate themselves.

Calls are serialised by a process-wide lock: they are short, the manager makes them from one
thread, and the models share one `DatabaseProxy`, which each call points at its own store's
database (so several stores may be open at once, as in tests). On PostgreSQL each call takes a
connection from a pool of at most `pool_size` and returns it; a connection the server dropped
(restart, failover) is replaced and the call retried once. SQLite keeps one connection open
for the store's life, which `:memory:` needs anyway.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee
import structlog
from playhouse.pool import PooledPostgresqlDatabase

from opmasd.core.errors import StoreError
from opmasd.core.model import AgentRecord, Transition
from opmasd.core.urls import redacted
from opmasd.store import migrations
from opmasd.store.models import (
    AgentRow,
    TransitionRow,
    agent_from_row,
    agent_to_row,
    database_proxy,
    transition_from_row,
    transition_to_row,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

ACCEPTED_URLS = (
    "sqlite:///absolute/path.db, sqlite:///:memory:, postgresql://user:pass@host:port/db "
    "(also postgres://, postgresql+asyncpg://, postgresql+psycopg2://)"
)
_POSTGRES_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2"}
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The lock every call holds; see the module docstring.
_CALL_LOCK = threading.RLock()


def _sqlite_database(url: str) -> peewee.SqliteDatabase:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc or not path.startswith("/") or parts.query:
        raise ValueError(f"bad SQLite URL {url!r}: expected sqlite:///absolute/path.db or sqlite:///:memory:")
    if path == "/:memory:":
        target = ":memory:"
    else:
        # sqlite:////abs (SQLAlchemy's spelling of an absolute path) means the same file.
        file = Path("/" + path.lstrip("/"))
        if file.name == "":
            raise ValueError(f"bad SQLite URL {url!r}: no file name")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("store.open_failed", url=url, error=str(exc))
            raise StoreError(f"cannot create the directory of the database {url}: {exc}") from exc
        target = str(file)
    return peewee.SqliteDatabase(
        target,
        pragmas={
            # WAL: readers do not block the writer; NORMAL is durable across process crashes
            # in WAL mode, and only a power loss may cost the last commits.
            "journal_mode": "wal",
            "synchronous": "normal",
            "foreign_keys": 1,
            "busy_timeout": 5000,
        },
        # Take the write lock at BEGIN: upgrading a read lock later fails at once with
        # SQLITE_BUSY instead of waiting out busy_timeout.
        lock_type="IMMEDIATE",
        # One connection shared under _CALL_LOCK, whichever thread calls.
        thread_safe=False,
        check_same_thread=False,
    )


def _postgres_database(url: str, pool_size: int) -> peewee.PostgresqlDatabase:
    parts = urlsplit(url)
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise ValueError(f"bad PostgreSQL URL {redacted(url)!r}: no database name")
    params: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = params.pop("schema", None)
    if schema is not None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema {schema!r} in PostgreSQL URL: use letters, digits and _")
        params["options"] = f"{params.get('options', '')} -c search_path={schema}".strip()
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password:
        params["password"] = unquote(parts.password)
    if parts.hostname:
        params["host"] = parts.hostname
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in PostgreSQL URL {redacted(url)!r}") from exc
    if port is not None:
        params["port"] = port
    # libpq waits forever for an unreachable host by default; a daemon should report it.
    params.setdefault("connect_timeout", 10)
    params.setdefault("application_name", "opmasd")
    # playhouse.pool has no type annotations.
    database: peewee.PostgresqlDatabase = PooledPostgresqlDatabase(  # type: ignore[no-untyped-call]
        dbname,
        max_connections=pool_size,
        # Recycle idle connections before firewalls and proxies silently cut them.
        stale_timeout=300,
        timeout=10,
        **params,
    )
    return database


def database_from_url(url: str, *, pool_size: int = 5) -> peewee.Database:
    """An unconnected peewee database for `url`; ValueError for a URL we do not accept."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        return _sqlite_database(url)
    if scheme in _POSTGRES_SCHEMES:
        return _postgres_database(url, pool_size)
    raise ValueError(
        f"unsupported database URL scheme {scheme or '(none)'!r} in {redacted(url)!r}: accepted are "
        + ACCEPTED_URLS
    )


class SqlStore:
    """The AgentStore on a SQL database. Build it with SqlStore.open(url)."""

    def __init__(self, database: peewee.Database, url: str) -> None:
        self._db = database
        self._url = redacted(url)
        self._postgres = isinstance(database, peewee.PostgresqlDatabase)
        self._closed = False
        self.schema_version = 0

    @classmethod
    def open(cls, url: str, *, pool_size: int = 5) -> SqlStore:
        """Connect, migrate the schema to this code's version, and return the store.

        ValueError for a URL that is not accepted; StoreError when the database cannot be
        opened or migrated, or its schema is newer than this code.
        """
        store = cls(database_from_url(url, pool_size=pool_size), url)
        try:
            store.schema_version = store._call("open and migrate the database", store._migrate, write=False)
        except BaseException:
            store.close()
            raise
        log.info("store.opened", url=store._url, schema_version=store.schema_version)
        return store

    def _migrate(self) -> int:
        return migrations.migrate(self._db)

    # -- the AgentStore protocol --------------------------------------------------------------

    def load_agents(self) -> list[AgentRecord]:
        def work() -> list[AgentRecord]:
            return [_agent(row) for row in AgentRow.select().order_by(AgentRow.agent_id)]

        return self._call("load agents", work, write=False)

    def save_agent(self, record: AgentRecord) -> None:
        self._call(f"save agent {record.agent_id}", lambda: self._upsert(record), write=True)

    def record_transition(self, record: AgentRecord, transition: Transition) -> None:
        _check_same_agent(record, transition)

        def work() -> None:
            self._upsert(record)
            TransitionRow.insert(**transition_to_row(transition)).execute()

        # Not idempotent: retried only if the connection broke before the transaction began.
        what = f"record transition of {record.agent_id} to {transition.state.value}"
        self._call(what, work, write=True, idempotent=False)

    def write_batch(self, records: Sequence[AgentRecord], transitions: Sequence[Transition]) -> None:
        if not records and not transitions:
            return

        def work() -> None:
            # Plain executemany on statements built once: peewee building a 200-row INSERT
            # was a third of the CPU of stopping 200 agents at once.
            cursor = self._db.cursor()  # type: ignore[no-untyped-call]
            if records:
                cursor.executemany(self._agent_upsert, [_params(AgentRow, agent_to_row(r)) for r in records])
            if transitions:
                rows = [_params(TransitionRow, transition_to_row(t)) for t in transitions]
                cursor.executemany(self._transition_insert, rows)

        # Not idempotent (transitions are appended): retried only if it never began.
        what = f"write {len(records)} agents and {len(transitions)} transitions"
        self._call(what, work, write=True, idempotent=False)

    def save_heartbeats(self, last_seen: Mapping[str, datetime]) -> None:
        if not last_seen:
            return

        def work() -> None:
            for agent_id, seen in last_seen.items():
                AgentRow.update(last_heartbeat=seen).where(AgentRow.agent_id == agent_id).execute()

        self._call(f"save heartbeats of {len(last_seen)} agents", work, write=True)

    def transitions(self, agent_id: str, limit: int = 100) -> list[Transition]:
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")

        def work() -> list[Transition]:
            query = (
                TransitionRow.select()
                .where(TransitionRow.agent == agent_id)
                .order_by(TransitionRow.id.desc())
                .limit(limit)
            )
            return [transition_from_row(row) for row in query]

        return self._call(f"load transitions of {agent_id}", work, write=False)

    def prune_transitions(self, keep_per_agent: int) -> int:
        if keep_per_agent < 0:
            raise ValueError(f"keep_per_agent must not be negative, not {keep_per_agent}")

        def work() -> int:
            # Rank each agent's transitions newest first; everything ranked past the limit goes.
            rank = (
                peewee.fn.ROW_NUMBER()
                .over(partition_by=[TransitionRow.agent], order_by=[TransitionRow.id.desc()])
                .alias("rank")
            )
            ranked = TransitionRow.select(TransitionRow.id, rank).alias("ranked")
            doomed = peewee.Select(from_list=[ranked], columns=[ranked.c.id]).where(
                ranked.c.rank > keep_per_agent
            )
            return int(TransitionRow.delete().where(TransitionRow.id.in_(doomed)).execute())

        return self._call("prune transitions", work, write=True)

    def close(self) -> None:
        with _CALL_LOCK:
            if self._closed:
                return
            self._closed = True
            try:
                if isinstance(self._db, PooledPostgresqlDatabase):
                    self._db.close_all()  # type: ignore[no-untyped-call]
                else:
                    self._db.close()
            except peewee.PeeweeException as exc:
                # Closing is best effort: the store is unusable from here on either way.
                log.warning("store.close_failed", url=self._url, error=str(exc))
            if database_proxy.obj is self._db:
                database_proxy.initialize(None)
            log.info("store.closed", url=self._url)

    # -- running a call -----------------------------------------------------------------------

    def _upsert(self, record: AgentRecord) -> None:
        row = agent_to_row(record)
        AgentRow.insert(**row).on_conflict(
            conflict_target=[AgentRow.agent_id], preserve=self._preserved
        ).execute()

    # An upsert, not REPLACE: SQLite's REPLACE deletes the old row first, which would cascade to
    # the agent's transitions.
    _preserved = [field for field in AgentRow._meta.sorted_fields if field.name != "agent_id"]

    @functools.cached_property
    def _agent_upsert(self) -> str:
        columns = [field.column_name for field in _insert_fields(AgentRow)]
        names = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join([self._db.param] * len(columns))
        updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c != "agent_id")
        upsert = f'ON CONFLICT ("agent_id") DO UPDATE SET {updates}'
        return f'INSERT INTO "agents" ({names}) VALUES ({values}) {upsert}'

    @functools.cached_property
    def _transition_insert(self) -> str:
        columns = [field.column_name for field in _insert_fields(TransitionRow)]
        names = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join([self._db.param] * len(columns))
        return f'INSERT INTO "agent_transitions" ({names}) VALUES ({values})'

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        if self._postgres:
            # Borrow a pooled connection for this call only (returned, or dropped if broken).
            with self._db.connection_context():
                yield
        else:
            self._db.connect(reuse_if_open=True)
            yield

    def _call(self, what: str, work: Callable[[], T], *, write: bool, idempotent: bool = True) -> T:
        """Run `work` against this store's database; database errors become StoreError.

        write: in a transaction, so a failure leaves nothing half-written.
        idempotent: safe to run again after an error whose outcome is unknown.
        """
        with _CALL_LOCK:
            if self._closed:
                raise StoreError(f"cannot {what}: the store is closed")
            if database_proxy.obj is not self._db:
                database_proxy.initialize(self._db)
            for attempt in (1, 2):
                began = False
                try:
                    with self._connection():
                        if not write:
                            began = True
                            return work()
                        with self._db.atomic():
                            began = True
                            return work()
                except (peewee.OperationalError, peewee.InterfaceError) as exc:
                    # A dropped PostgreSQL connection fails on its first use. Retry once on a
                    # fresh one, unless the failed call may have committed and must not repeat.
                    if attempt == 1 and self._postgres and (idempotent or not began):
                        log.warning("store.reconnect", url=self._url, operation=what, error=str(exc))
                        self._discard_idle_connections()
                        continue
                    raise self._failure(what, exc) from exc
                except peewee.PeeweeException as exc:
                    raise self._failure(what, exc) from exc
            raise AssertionError("unreachable: the second attempt returns or raises")

    def _discard_idle_connections(self) -> None:
        # The pool's other idle connections went down with the same server.
        if isinstance(self._db, PooledPostgresqlDatabase):
            self._db.close_idle()

    def _failure(self, what: str, exc: Exception) -> StoreError:
        message = str(exc).strip() or type(exc).__name__
        # A rollback failing on a dead connection hides the error that killed it: keep both.
        first = exc.__context__
        if isinstance(first, peewee.PeeweeException) and str(first).strip() not in ("", message):
            message = f"{message}, after: {str(first).strip()}"
        log.error("store.failed", url=self._url, operation=what, error=message, exc_type=type(exc).__name__)
        return StoreError(f"{what} failed ({self._url}): {message}")


def _agent(row: AgentRow) -> AgentRecord:
    try:
        return agent_from_row(row)
    except (ValueError, KeyError, TypeError) as exc:
        # Refuse to start on a row we cannot read rather than silently forget the agent.
        log.error("store.unreadable_row", agent_id=row.agent_id, error=repr(exc))
        raise StoreError(f"the stored row of agent {row.agent_id!r} cannot be read: {exc!r}") from exc


def _check_same_agent(record: AgentRecord, transition: Transition) -> None:
    if transition.agent_id != record.agent_id:
        raise ValueError(
            f"transition of agent {transition.agent_id!r} recorded with the row of {record.agent_id!r}"
        )


def _insert_fields(model: type[peewee.Model]) -> list[peewee.Field]:
    """The columns an INSERT sets: all but an auto-incremented id."""
    return [f for f in model._meta.sorted_fields if not isinstance(f, peewee.AutoField)]


def _params(model: type[peewee.Model], row: Mapping[str, Any]) -> list[Any]:
    """A row's values in column order, as the database takes them (the fields' db_value)."""
    return [field.db_value(row[field.name]) for field in _insert_fields(model)]  # type: ignore[no-untyped-call]
