"""The audit trail's records: who did what, from where, through which door, with what result.

Every operation that changes something (each RPC whose role is above viewer, the same commands
over NATS) is recorded once it is answered, and so is every refused attempt (a burst of the
same refusals as one record with its count). The api layer makes the records (it knows the
caller and the request); the manager keeps them (manager.audit) and the store holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Bounds of what one record keeps (a hostile request must not make a huge row).
MAX_TARGET = 256
MAX_MESSAGE = 1024
MAX_PARAMETERS_BYTES = 4096
# Each text field's bound in characters: the store's column widths, applied by the manager as a
# record is queued too, so that what waits in memory is bounded as well.
WIDTHS = {
    "actor": 160,
    "peer": 160,
    "entry_point": 16,
    "operation": 64,
    "target": MAX_TARGET,
    "result": 32,
    "message": MAX_MESSAGE,
    "node": 255,
}


@dataclass(frozen=True)
class AuditRecord:
    time: datetime
    actor: str  # "local", "token:<id>", "anonymous", "anyone (auth disabled)"
    peer: str  # "unix:", "ipv4:ADDR:PORT", "ipv6:[ADDR]:PORT", "nats:"
    entry_point: str  # "grpc", "rest", "nats"
    operation: str  # the RPC's name: "StopAgent", "CreateToken", ...
    target: str  # an agent id, a token id, "all", "label_selector=…", "" when none
    parameters: dict[str, Any]  # the request's fields, secrets redacted, bounded
    result: str  # "OK", or a google.rpc.Code name: "NOT_FOUND", "PERMISSION_DENIED", ...
    message: str = ""  # the error's message, when it failed
    node: str = ""
    # How many times this happened: refusals in a burst are kept as one record.
    count: int = 1
    id: int | None = field(default=None, compare=False)  # the store's, once written


@dataclass(frozen=True)
class AuditFilter:
    """Which records to list, newest first; every field that is set must match."""

    target: str = ""  # an agent id (or a token id)
    actor: str = ""
    since: datetime | None = None
    before_id: int | None = None  # for the next page: records older than this one
    limit: int = 100
