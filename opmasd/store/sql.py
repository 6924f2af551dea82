"""SqlStore: the AgentStore on SQLite or PostgreSQL, through peewee.

Open it with SqlStore.open(url); the URLs it takes are described in database.py.

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
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

import peewee
import psycopg2  # type: ignore[import-untyped]
import structlog
from playhouse.pool import PooledPostgresqlDatabase

from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.core.auth import ApiToken
from opmasd.core.errors import StoreError, StoreRejected
from opmasd.core.model import AgentRecord, Transition
from opmasd.core.urls import redacted
from opmasd.store import audit_rows, migrations, token_rows
from opmasd.store.database import database_from_url
from opmasd.store.deadline import ConnectionCutter, call_deadline
from opmasd.store.models import (
    AgentRow,
    TransitionRow,
    agent_from_row,
    agent_to_row,
    database_proxy,
    transition_from_row,
    transition_to_row,
)
from opmasd.store.statements import agent_upsert, row_params, transition_insert

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Errors about the values written, not the connection: the same write would fail again.
_REJECTIONS = (
    peewee.IntegrityError,
    peewee.DataError,
    peewee.ProgrammingError,
    peewee.NotSupportedError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    psycopg2.IntegrityError,
    psycopg2.DataError,
    psycopg2.ProgrammingError,
    ValueError,
)

# The lock every call holds; see the module docstring.
_CALL_LOCK = threading.RLock()


class SqlStore:
    """The AgentStore on a SQL database. Build it with SqlStore.open(url)."""

    def __init__(self, database: peewee.Database, url: str) -> None:
        self._db = database
        self._url = redacted(url)
        self._postgres = isinstance(database, peewee.PostgresqlDatabase)
        self._call_deadline = call_deadline(database)
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
            # Plain executemany on statements built once (statements.py says why). The raw
            # cursor raises the driver's own exceptions: peewee's wrapper turns them into
            # peewee's, which _call maps to StoreError like every other call's.
            cursor = self._db.cursor()  # type: ignore[no-untyped-call]
            with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                if records:
                    rows = [row_params(AgentRow, agent_to_row(r)) for r in records]
                    cursor.executemany(self._agent_upsert, rows)
                if transitions:
                    rows = [row_params(TransitionRow, transition_to_row(t)) for t in transitions]
                    cursor.executemany(self._transition_insert, rows)

        # Not idempotent (transitions are appended): retried only if it never began.
        what = f"write {len(records)} agents and {len(transitions)} transitions"
        self._call(what, work, write=True, idempotent=False)

    def commit_rows(self, records: Sequence[AgentRecord]) -> None:
        self.write_batch(records, ())

    def sync(self) -> None:
        """One database: nothing is kept elsewhere."""

    def save_heartbeats(self, last_seen: Mapping[str, datetime]) -> None:
        if not last_seen:
            return

        def work() -> None:
            for agent_id, seen in last_seen.items():
                AgentRow.update(last_heartbeat=seen).where(AgentRow.agent_id == agent_id).execute()

        self._call(f"save heartbeats of {len(last_seen)} agents", work, write=True)

    def load_tokens(self) -> list[ApiToken]:
        return self._call("load API tokens", token_rows.load_all, write=False)

    def save_token(self, token: ApiToken) -> None:
        self._call(f"save API token {token.token_id}", lambda: token_rows.save(token), write=True)

    def append_audit(self, records: Sequence[AuditRecord]) -> None:
        if records:  # appended: retried only if it never began
            what = f"append {len(records)} audit records"
            self._call(what, lambda: audit_rows.append(records), write=True, idempotent=False)

    def audit_records(self, query: AuditFilter) -> list[AuditRecord]:
        if query.limit < 0:
            raise ValueError(f"limit must not be negative, not {query.limit}")
        return self._call("read audit records", lambda: audit_rows.select(query), write=False)

    def prune_audit(self, keep: int) -> int:
        if keep < 0:
            raise ValueError(f"keep must not be negative, not {keep}")
        return self._call("prune audit records", lambda: audit_rows.prune(keep), write=True)

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

    def rows_of(self, agent_ids: Sequence[str]) -> dict[str, AgentRecord]:
        """The rows of these agents that exist (for FleetStore to put its copy back)."""
        if not agent_ids:
            return {}

        def work() -> dict[str, AgentRecord]:
            query = AgentRow.select().where(AgentRow.agent_id.in_(list(agent_ids)))
            return {row.agent_id: _agent(row) for row in query}

        return self._call(f"load {len(agent_ids)} agents", work, write=False)

    def remove_rows(self, created: Mapping[str, datetime]) -> None:
        if not created:
            return

        def work() -> None:
            for agent_id, at in created.items():
                row = AgentRow.get_or_none((AgentRow.agent_id == agent_id) & (AgentRow.created_at == at))
                if row is not None:
                    TransitionRow.delete().where(TransitionRow.agent == agent_id).execute()
                    row.delete_instance()

        self._call(f"remove {len(created)} agents", work, write=True)

    def newest_transition_times(self) -> dict[str, datetime]:
        """Per agent, the time of its newest transition (for FleetStore's catch-up)."""

        def work() -> dict[str, datetime]:
            newest = peewee.fn.MAX(TransitionRow.at).alias("newest")
            query = TransitionRow.select(TransitionRow.agent, newest).group_by(TransitionRow.agent)
            field = TransitionRow.at
            return {row.agent_id: field.python_value(getattr(row, "newest")) for row in query}  # noqa: B009

        return self._call("read the newest transition times", work, write=False)

    def transitions_after(self, since: Mapping[str, datetime | None]) -> list[Transition]:
        """Per agent, its transitions later than the given time (all, for None), oldest first:
        what another database lacks of this one's history (FleetStore's catch-up)."""

        def work() -> list[Transition]:
            found: list[Transition] = []
            for agent_id, after in since.items():
                condition = TransitionRow.agent == agent_id
                if after is not None:
                    condition &= TransitionRow.at > after
                query = TransitionRow.select().where(condition).order_by(TransitionRow.id)
                found += [transition_from_row(row) for row in query]
            return found

        return self._call("read transitions to catch up", work, write=False)

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
        return agent_upsert(self._db.param)

    @functools.cached_property
    def _transition_insert(self) -> str:
        return transition_insert(self._db.param)

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
                cut: list[ConnectionCutter] = []
                try:
                    with self._connection(), self._deadline(what, cut):
                        if not write:
                            began = True
                            return work()
                        with self._db.atomic():
                            began = True
                            return work()
                except (peewee.OperationalError, peewee.InterfaceError) as exc:
                    # A pooled connection the server dropped fails on its first use: retry
                    # once on a fresh one, unless the failed call may have committed and must
                    # not repeat. Not when no connection could be made, nor after a cut past the
                    # deadline: then the server is away or hung, not the connection stale.
                    stale = bool(cut) and not cut[0].fired
                    if attempt == 1 and self._postgres and (idempotent or not began) and stale:
                        log.warning("store.reconnect", url=self._url, operation=what, error=str(exc))
                        self._discard_idle_connections()
                        continue
                    raise self._failure(what, exc) from exc
                except peewee.PeeweeException as exc:
                    raise self._failure(what, exc) from exc
                except (sqlite3.Error, psycopg2.Error, ValueError) as exc:
                    # A driver error that reached us unwrapped, or a value a driver cannot send
                    # (psycopg2 refuses a NUL in a string with ValueError): a store error too.
                    raise self._failure(what, exc) from exc
            raise AssertionError("unreachable: the second attempt returns or raises")

    @contextlib.contextmanager
    def _deadline(self, what: str, cut: list[ConnectionCutter]) -> Iterator[None]:
        """Bound a PostgreSQL call: past CALL_DEADLINE its connection is cut, so the call fails
        (and the connection is replaced). statement_timeout is the server's own bound, and a
        frozen server (SIGSTOP, a hung host whose kernel still answers TCP keepalives) never
        applies it: the client would wait forever on a socket that stays open."""
        if not self._postgres:
            yield
            return
        cutter = ConnectionCutter(self._db.connection(), what, self._url, self._call_deadline)  # type: ignore[no-untyped-call]
        cut.append(cutter)
        timer = threading.Timer(self._call_deadline, cutter)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            cutter.disarm()
            timer.cancel()

    def _discard_idle_connections(self) -> None:
        # The pool's other idle connections went down with the same server.
        if isinstance(self._db, PooledPostgresqlDatabase):
            self._db.close_idle()

    def _failure(self, what: str, exc: Exception) -> StoreError:
        message = str(exc).strip() or type(exc).__name__
        # A rollback failing (on a dead connection, a full disk) hides the error that caused
        # it: keep the earlier ones too ("cannot rollback ..., after: database or disk is full").
        earlier: BaseException | None = exc.__context__ or exc.__cause__
        for _ in range(3):
            if earlier is None:
                break
            text = str(earlier).strip()
            if text and text not in message:
                message = f"{message}, after: {text}"
            earlier = earlier.__context__ or earlier.__cause__
        log.error("store.failed", url=self._url, operation=what, error=message, exc_type=type(exc).__name__)
        kind = StoreRejected if isinstance(exc, _REJECTIONS) else StoreError
        return kind(f"{what} failed ({self._url}): {message}")


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
