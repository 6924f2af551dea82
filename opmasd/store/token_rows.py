"""The API token rows' work for SqlStore: load them all, save one (insert or replace).

These run inside SqlStore._call, which points the models at the store's database, holds the
call lock, opens the transaction of a write and turns database errors into StoreError.
"""

from __future__ import annotations

import structlog

from opmasd.core.auth import ApiToken
from opmasd.store.models import ApiTokenRow, token_from_row, token_to_row

log = structlog.get_logger(__name__)

# Every column but the key: what an existing row of the same token_id takes from the new one.
_PRESERVED = [field for field in ApiTokenRow._meta.sorted_fields if field.name != "token_id"]


def load_all() -> list[ApiToken]:
    """Every token row, by token_id. A row this code cannot read (a role it does not know) is
    left out and logged: a token not loaded is refused, never granted more than it was."""
    tokens: list[ApiToken] = []
    for row in ApiTokenRow.select().order_by(ApiTokenRow.token_id):
        try:
            tokens.append(token_from_row(row))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("store.unreadable_token_row", token_id=row.token_id, error=repr(exc))
    return tokens


def save(token: ApiToken) -> None:
    """Insert the token's row, or replace every column of the row of the same token_id."""
    ApiTokenRow.insert(**token_to_row(token)).on_conflict(
        conflict_target=[ApiTokenRow.token_id], preserve=_PRESERVED
    ).execute()
