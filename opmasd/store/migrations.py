"""The schema's history: ordered steps that take a database from version N-1 to N.

Each step runs in its own transaction together with the row recording its version, so a
database is always at some exact version (SQLite and PostgreSQL both have transactional DDL).
A step is frozen once released: it defines the tables it creates itself instead of using the
models in `models`, which describe only the latest version. A later release appends a step
(e.g. with `playhouse.migrate`) and updates the models; it never edits an earlier step.

Several daemons may share one PostgreSQL database (one per node). They serialise here on a
transaction-scoped advisory lock and re-read the version under it, so a step runs once.
On SQLite, `BEGIN IMMEDIATE` (the store's transaction mode) does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import peewee
import structlog

from opmasd.core.errors import StoreError
from opmasd.store.models import SchemaVersion

log = structlog.get_logger(__name__)

# Any constant will do: PostgreSQL advisory locks are named by a 64-bit integer.
_PG_MIGRATION_LOCK = 0x6F706D6173  # "opmas"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[peewee.Database], None]


def _v1_create_tables(db: peewee.Database) -> None:
    """Version 1: agents and agent_transitions, as they were in the first release."""

    class Agent(peewee.Model):
        agent_id = peewee.CharField(max_length=255, primary_key=True)
        name = peewee.CharField(max_length=255)
        type = peewee.CharField(max_length=255)
        node = peewee.CharField(max_length=255)
        source = peewee.CharField(max_length=32)
        manifest_path = peewee.TextField()
        spec = peewee.TextField()
        desired = peewee.CharField(max_length=32)
        state = peewee.CharField(max_length=32)
        state_reason = peewee.TextField()
        state_changed_at = peewee.DateTimeField()
        pid = peewee.IntegerField(null=True)
        pid_start_time = peewee.DoubleField(null=True)
        started_at = peewee.DateTimeField(null=True)
        restart_count = peewee.IntegerField()
        consecutive_failures = peewee.IntegerField()
        last_exit_code = peewee.IntegerField(null=True)
        last_exit_signal = peewee.IntegerField(null=True)
        last_exit_time = peewee.DateTimeField(null=True)
        last_heartbeat = peewee.DateTimeField(null=True)
        next_restart_at = peewee.DateTimeField(null=True)
        created_at = peewee.DateTimeField()
        updated_at = peewee.DateTimeField()
        deleted = peewee.BooleanField()

        class Meta:
            database = db
            table_name = "agents"

    class AgentTransition(peewee.Model):
        id = peewee.BigAutoField()
        agent = peewee.ForeignKeyField(
            Agent, field=Agent.agent_id, column_name="agent_id", on_delete="CASCADE", index=False
        )
        previous = peewee.CharField(max_length=32)
        state = peewee.CharField(max_length=32)
        reason = peewee.TextField()
        at = peewee.DateTimeField()

        class Meta:
            database = db
            table_name = "agent_transitions"
            indexes = ((("agent", "id"), False),)

    # safe=False: a table already there means the version bookkeeping is wrong; say so.
    db.create_tables([Agent, AgentTransition], safe=False)


def _v2_create_api_tokens(db: peewee.Database) -> None:
    """Version 2: api_tokens, the bearer tokens of remote callers (only a hash of each secret)."""

    class ApiToken(peewee.Model):
        token_id = peewee.CharField(max_length=16, primary_key=True)
        role = peewee.IntegerField()
        description = peewee.CharField(max_length=256)
        secret_hash = peewee.CharField(max_length=64)
        created_at = peewee.DateTimeField()
        created_by = peewee.CharField(max_length=128)
        expires_at = peewee.DateTimeField(null=True)
        revoked_at = peewee.DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "api_tokens"

    db.create_tables([ApiToken], safe=False)


def _v3_create_audit_records(db: peewee.Database) -> None:
    """Version 3: audit_records, the audit trail (who did what, from where, with what result)."""

    class AuditRecord(peewee.Model):
        id = peewee.BigAutoField()
        time = peewee.DateTimeField()
        actor = peewee.CharField(max_length=160)
        peer = peewee.CharField(max_length=160)
        entry_point = peewee.CharField(max_length=16)
        operation = peewee.CharField(max_length=64)
        target = peewee.CharField(max_length=256)
        parameters = peewee.TextField()
        result = peewee.CharField(max_length=32)
        message = peewee.TextField()
        node = peewee.CharField(max_length=255)
        count = peewee.IntegerField()

        class Meta:
            database = db
            table_name = "audit_records"
            indexes = (
                (("time",), False),
                (("target", "id"), False),
                (("actor", "id"), False),
            )

    db.create_tables([AuditRecord], safe=False)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create agents and agent_transitions", _v1_create_tables),
    Migration(2, "create api_tokens", _v2_create_api_tokens),
    Migration(3, "create audit_records", _v3_create_audit_records),
)
LATEST_VERSION = MIGRATIONS[-1].version


def _lock(db: peewee.Database) -> None:
    """Serialise schema changes between daemons sharing a PostgreSQL database."""
    if isinstance(db, peewee.PostgresqlDatabase):
        peewee.Select(columns=[peewee.fn.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)]).bind(db).scalar()


def _current_version(db: peewee.Database) -> int:
    version = SchemaVersion.select(peewee.fn.MAX(SchemaVersion.version)).scalar()
    return int(version) if version is not None else 0


def _check_known(version: int) -> None:
    if version > LATEST_VERSION:
        log.error("store.schema_too_new", version=version, known=LATEST_VERSION)
        raise StoreError(
            f"database schema version {version} is newer than this opmasd (knows {LATEST_VERSION}): "
            "upgrade opmasd, or point database.url at another database"
        )


def migrate(db: peewee.Database) -> int:
    """Bring the database to LATEST_VERSION; returns the version it ends at.

    Raises StoreError when the database is newer than this code. Database errors propagate
    as peewee exceptions, for the caller to wrap.
    """
    # bind_ctx, not the proxy: migrations work on the database they are given.
    with db.bind_ctx([SchemaVersion]):
        with db.atomic():
            _lock(db)
            SchemaVersion.create_table(safe=True)
            version = _current_version(db)
        _check_known(version)
        for step in MIGRATIONS:
            if step.version <= version:
                continue
            with db.atomic():
                _lock(db)
                # Another daemon may have applied it while we waited for the lock.
                version = _current_version(db)
                _check_known(version)
                if step.version <= version:
                    continue
                log.info("store.migrate", version=step.version, description=step.description)
                step.apply(db)
                SchemaVersion.create(version=step.version)
                version = step.version
        return version
