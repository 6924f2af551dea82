"""RFC 3339 timestamps, the only time format on the wire (DESIGN §5)."""

from __future__ import annotations

from datetime import UTC, datetime


def timestamp(moment: datetime | None = None) -> str:
    """`moment` (default: now) as RFC 3339 UTC with milliseconds, e.g. `2026-11-24T07:54:47.123Z`.

    A naive datetime is taken to be UTC already: agents deal in UTC, and guessing the host's
    local zone would shift every record by the machine's offset.
    """
    moment = datetime.now(UTC) if moment is None else moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 string as an aware UTC datetime; ValueError when it is not one.

    Python 3.11's `fromisoformat` accepts `Z` and any fraction length. A value without an offset
    is read as UTC, for the same reason as in `timestamp`.
    """
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
