"""The store's tables as peewee models, and the conversion between their rows and domain types.

The models are bound to `database_proxy`, which `SqlStore` points at a SQLite or PostgreSQL
database, so one set of models serves both. They describe the schema's *latest* version; the
steps that build and change real tables live in `migrations`, frozen, because a model changes
with the code while a migration must keep doing what it did when it shipped.

Datetimes are stored as naive UTC (`TIMESTAMP` on PostgreSQL, ISO text on SQLite): SQLite has
no time zones, and one convention for both backends keeps ordering and comparisons identical.
They are converted to UTC on the way in and come back tz-aware (UTC) on the way out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import peewee

from opmasd.core.audit import MAX_PARAMETERS_BYTES, MAX_TARGET, WIDTHS, AuditRecord
from opmasd.core.auth import ApiToken, Role
from opmasd.core.model import (
    AgentRecord,
    AgentSource,
    AgentSpec,
    AgentState,
    DesiredState,
    ExitInfo,
    Transition,
)

database_proxy = peewee.DatabaseProxy()


def to_utc_naive(value: datetime) -> datetime:
    """An aware datetime as naive UTC; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def from_utc_naive(value: datetime) -> datetime:
    """A stored datetime back as aware UTC (psycopg2 may hand back an aware one: normalise)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class UtcDateTimeField(peewee.DateTimeField):
    """A DateTimeField that stores naive UTC and reads back aware UTC."""

    def db_value(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return to_utc_naive(value)
        return value

    def python_value(self, value: Any) -> Any:
        if isinstance(value, str):
            # SQLite hands back the text form sqlite3's adapter wrote (ISO 8601, space-separated).
            value = datetime.fromisoformat(value)
        if isinstance(value, datetime):
            return from_utc_naive(value)
        return value


class BaseRow(peewee.Model):
    class Meta:
        database = database_proxy


class AgentRow(BaseRow):
    """One agent: spec (as JSON), desired state and last observed state."""

    agent_id = peewee.CharField(max_length=255, primary_key=True)
    # name and type repeat spec fields as columns so that an operator can query them.
    name = peewee.CharField(max_length=255)
    type = peewee.CharField(max_length=255)
    node = peewee.CharField(max_length=255)
    source = peewee.CharField(max_length=32)
    manifest_path = peewee.TextField()
    spec = peewee.TextField()
    desired = peewee.CharField(max_length=32)
    state = peewee.CharField(max_length=32)
    state_reason = peewee.TextField()
    state_changed_at = UtcDateTimeField()
    pid = peewee.IntegerField(null=True)
    pid_start_time = peewee.DoubleField(null=True)
    started_at = UtcDateTimeField(null=True)
    restart_count = peewee.IntegerField()
    consecutive_failures = peewee.IntegerField()
    last_exit_code = peewee.IntegerField(null=True)
    last_exit_signal = peewee.IntegerField(null=True)
    last_exit_time = UtcDateTimeField(null=True)
    last_heartbeat = UtcDateTimeField(null=True)
    next_restart_at = UtcDateTimeField(null=True)
    created_at = UtcDateTimeField()
    updated_at = UtcDateTimeField()
    deleted = peewee.BooleanField()

    class Meta:
        table_name = "agents"


class TransitionRow(BaseRow):
    """One state change of an agent. Append order (id) is the order of events."""

    id = peewee.BigAutoField()
    # A foreign key: a transition never outlives or precedes its agent's row. Agents are
    # tombstoned, not deleted, so the cascade only matters to an operator cleaning up by hand.
    agent = peewee.ForeignKeyField(
        AgentRow, field=AgentRow.agent_id, column_name="agent_id", on_delete="CASCADE", index=False
    )
    # The raw key, without loading the agent: peewee provides it as the column name.
    agent_id: str
    previous = peewee.CharField(max_length=32)
    state = peewee.CharField(max_length=32)
    reason = peewee.TextField()
    at = UtcDateTimeField()

    class Meta:
        table_name = "agent_transitions"
        # Serves "an agent's latest transitions" (and the agent_id lookup on its own).
        indexes = ((("agent", "id"), False),)


class ApiTokenRow(BaseRow):
    """One API token: its role and who made it, with only a hash of its secret."""

    token_id = peewee.CharField(max_length=16, primary_key=True)
    role = peewee.IntegerField()
    description = peewee.CharField(max_length=256)
    secret_hash = peewee.CharField(max_length=64)
    created_at = UtcDateTimeField()
    created_by = peewee.CharField(max_length=128)
    expires_at = UtcDateTimeField(null=True)
    revoked_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "api_tokens"


# An INTEGER column: a count past it is kept at it.
MAX_AUDIT_COUNT = 2**31 - 1


class AuditRow(BaseRow):
    """One audited operation or burst of refusals (core.audit). Append order (id) is the order
    they were kept in; listing is newest first by id."""

    id = peewee.BigAutoField()
    time = UtcDateTimeField()
    actor = peewee.CharField(max_length=160)
    peer = peewee.CharField(max_length=160)
    entry_point = peewee.CharField(max_length=16)
    operation = peewee.CharField(max_length=64)
    target = peewee.CharField(max_length=MAX_TARGET)
    parameters = peewee.TextField()  # compact JSON, sorted keys, at most MAX_PARAMETERS_BYTES
    result = peewee.CharField(max_length=32)
    message = peewee.TextField()  # at most MAX_MESSAGE characters
    node = peewee.CharField(max_length=255)
    count = peewee.IntegerField()

    class Meta:
        table_name = "audit_records"
        # Pruning and "since" by time; an agent's (or token's) and a caller's records newest first.
        indexes = (
            (("time",), False),
            (("target", "id"), False),
            (("actor", "id"), False),
        )


class SchemaVersion(BaseRow):
    """One row per applied migration; the schema's version is the highest."""

    version = peewee.IntegerField(primary_key=True)

    class Meta:
        table_name = "schema_version"


def agent_to_row(record: AgentRecord) -> dict[str, Any]:
    """The column values of an agent's row, keyed by field name."""
    exit_info = record.last_exit
    return {
        "agent_id": record.agent_id,
        "name": record.spec.name,
        "type": record.spec.type,
        "node": record.node,
        "source": record.source.value,
        "manifest_path": record.manifest_path,
        # Sorted keys (AgentSpec.json_text): the same spec, the same text, so a diff of rows means a change.
        "spec": record.spec.json_text,
        "desired": record.desired.value,
        "state": record.state.value,
        "state_reason": record.state_reason,
        "state_changed_at": record.state_changed_at,
        "pid": record.pid,
        "pid_start_time": record.pid_start_time,
        "started_at": record.started_at,
        "restart_count": record.restart_count,
        "consecutive_failures": record.consecutive_failures,
        "last_exit_code": exit_info.exit_code if exit_info else None,
        "last_exit_signal": exit_info.signal if exit_info else None,
        # The exit time says whether there was an exit at all: code and signal are both None
        # for an adopted process whose status is unknown.
        "last_exit_time": exit_info.time if exit_info else None,
        "last_heartbeat": record.last_heartbeat,
        "next_restart_at": record.next_restart_at,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "deleted": record.deleted,
    }


def agent_from_row(row: AgentRow) -> AgentRecord:
    last_exit = None
    if row.last_exit_time is not None:
        last_exit = ExitInfo(row.last_exit_code, row.last_exit_signal, row.last_exit_time)
    return AgentRecord(
        agent_id=row.agent_id,
        spec=AgentSpec.from_dict(json.loads(row.spec)),
        source=AgentSource(row.source),
        manifest_path=row.manifest_path,
        node=row.node,
        created_at=row.created_at,
        updated_at=row.updated_at,
        deleted=bool(row.deleted),
        desired=DesiredState(row.desired),
        state=AgentState(row.state),
        state_reason=row.state_reason,
        state_changed_at=row.state_changed_at,
        pid=row.pid,
        pid_start_time=row.pid_start_time,
        started_at=row.started_at,
        restart_count=row.restart_count,
        consecutive_failures=row.consecutive_failures,
        last_exit=last_exit,
        last_heartbeat=row.last_heartbeat,
        next_restart_at=row.next_restart_at,
    )


def transition_to_row(transition: Transition) -> dict[str, Any]:
    return {
        "agent": transition.agent_id,
        "previous": transition.previous.value,
        "state": transition.state.value,
        "reason": transition.reason,
        "at": transition.at,
    }


def transition_from_row(row: TransitionRow) -> Transition:
    return Transition(
        agent_id=row.agent_id,
        previous=AgentState(row.previous),
        state=AgentState(row.state),
        reason=row.reason,
        at=row.at,
    )


def token_to_row(token: ApiToken) -> dict[str, Any]:
    return {
        "token_id": token.token_id,
        "role": int(token.role),
        "description": token.description,
        "secret_hash": token.secret_hash,
        "created_at": token.created_at,
        "created_by": token.created_by,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
    }


def token_from_row(row: ApiTokenRow) -> ApiToken:
    """ValueError for a role this code does not know."""
    return ApiToken(
        token_id=row.token_id,
        role=Role(row.role),
        description=row.description,
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def audit_to_row(record: AuditRecord) -> dict[str, Any]:
    """The column values of an audit record's row: text cleaned (no NUL, no lone surrogate:
    neither database takes them) and cut to its column's width, parameters as bounded JSON."""
    row: dict[str, Any] = {name: clean_text(getattr(record, name), w) for name, w in WIDTHS.items()}
    count = record.count if isinstance(record.count, int) else 1
    row.update(
        time=record.time,
        parameters=parameters_json(record.parameters),
        count=min(max(count, 0), MAX_AUDIT_COUNT),
    )
    return row


def audit_from_row(row: AuditRow) -> AuditRecord:
    try:
        parameters = json.loads(row.parameters)
    except ValueError:
        parameters = {"unreadable": True}
    if not isinstance(parameters, dict):
        parameters = {"value": parameters}
    return AuditRecord(
        time=row.time,
        actor=row.actor,
        peer=row.peer,
        entry_point=row.entry_point,
        operation=row.operation,
        target=row.target,
        parameters=parameters,
        result=row.result,
        message=row.message,
        node=row.node,
        count=row.count,
        id=row.id,
    )


def clean_text(value: object, width: int) -> str:
    """value as text a database takes, at most `width` characters: NUL and lone surrogates
    (which neither SQLite nor PostgreSQL stores) become U+FFFD."""
    text = (value if isinstance(value, str) else str(value))[:width].replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _json(value: Any) -> str:
    # ASCII only: as many bytes as characters, and a lone surrogate is escaped, not refused.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def parameters_json(parameters: object) -> str:
    """The parameters as compact JSON with sorted keys, at most MAX_PARAMETERS_BYTES: when the
    whole is longer, {"truncated": true} with as many of the fields (in key order) as fit.
    Always valid JSON (a value JSON cannot hold is kept as its str())."""
    if not isinstance(parameters, Mapping):
        parameters = {} if parameters is None else {"value": parameters}
    try:
        whole = _json(parameters)
    except (TypeError, ValueError, RecursionError):  # keys of mixed types, a cycle, too deep
        whole = None
    if whole is not None and len(whole) <= MAX_PARAMETERS_BYTES:
        return whole
    kept: dict[str, Any] = {"truncated": True}
    size = len(_json(kept))
    for key in sorted(parameters, key=str):
        name = str(key)
        if name in kept:
            continue
        try:
            field = f"{_json(name)}:{_json(parameters[key])}"
        except (TypeError, ValueError, RecursionError):
            continue
        if size + 1 + len(field) <= MAX_PARAMETERS_BYTES:
            kept[name] = parameters[key]
            size += 1 + len(field)
    return _json(kept)
