"""The audit trail's rows' work for SqlStore: append records, list them newest first, prune.

These run inside SqlStore._call, which points the models at the store's database, holds the
call lock, opens the transaction of a write and turns database errors into StoreError.
"""

from __future__ import annotations

from collections.abc import Sequence

import peewee

from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.store.models import AuditRow, audit_from_row, audit_to_row

# Rows per INSERT: 12 parameters each stays well under SQLite's bound on parameters (32766;
# 999 before SQLite 3.32) and PostgreSQL's (65535).
_ROWS_PER_INSERT = 50


def append(records: Sequence[AuditRecord]) -> None:
    """Insert the records' rows in order (ids left to the database)."""
    rows = [audit_to_row(record) for record in records]
    for chunk in peewee.chunked(rows, _ROWS_PER_INSERT):
        AuditRow.insert_many(chunk).execute()


def select(query: AuditFilter) -> list[AuditRecord]:
    """The matching records, newest (highest id) first, at most query.limit."""
    condition: peewee.Expression | bool = True
    if query.target:
        condition = AuditRow.target == query.target
    if query.actor:
        condition = (AuditRow.actor == query.actor) & condition
    if query.since is not None:
        condition = (AuditRow.time >= query.since) & condition
    if query.before_id is not None:
        condition = (AuditRow.id < query.before_id) & condition
    found = AuditRow.select().where(condition).order_by(AuditRow.id.desc()).limit(query.limit)
    return [audit_from_row(row) for row in found]


def prune(keep: int) -> int:
    """Delete every row older than the newest `keep`; returns how many went."""
    # The id of the newest row that goes: everything from it down is deleted.
    newest_doomed = AuditRow.select(AuditRow.id).order_by(AuditRow.id.desc()).offset(keep).limit(1).scalar()
    if newest_doomed is None:
        return 0
    return int(AuditRow.delete().where(AuditRow.id <= newest_doomed).execute())
