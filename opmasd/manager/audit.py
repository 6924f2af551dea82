"""AuditTrail: the records of what was done and what was refused, kept in the store.

The api layer hands over a record for every operation that changes something (`record`), and
every refused attempt (`refused`), as each call is answered. Neither may slow a call down or
fail it: both are synchronous, never raise and never touch the store. They log one structured
line and queue the record; `flush` (every second, and at stop) writes the queue in one store
call on the store's thread. While the store fails, the records wait for the next flush, the
queue bounded (past `max_pending`, the oldest go, and an error says how many).

Refusals come in floods (a scanner, a client with a stale token): they are counted, one pending
record per (actor, peer host, entry point, operation, result) whose count grows until it is
written, so 10 000 refused requests cost one row per flush. Past MAX_REFUSAL_KEYS distinct keys
they fold into keys of actor and peer "(many)".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from opmasd.core.audit import MAX_MESSAGE, MAX_PARAMETERS_BYTES, WIDTHS, AuditFilter, AuditRecord
from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.errors import FieldViolation, InvalidArgument, StoreError, StoreRejected, Unavailable
from opmasd.manager.persistence import WriteBehind
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)

FLUSH_INTERVAL = 1.0
# Rows the store keeps (the manager's cleanup prunes the rest).
KEEP = 100_000
MAX_QUERY_LIMIT = 1000
# Distinct refusal keys pending; past them, keys of actor and peer MANY (at most MAX_FOLDED_KEYS
# of those, then one key of MANY everywhere): memory stays bounded whatever callers send.
MAX_REFUSAL_KEYS = 1000
MAX_FOLDED_KEYS = 100
MANY = "(many)"
# Parameters are logged when their JSON is shorter than this; otherwise only their keys.
MAX_LOGGED_PARAMETERS = 512
MAX_LOGGED_KEYS = 32


@dataclass(frozen=True)
class _Key:
    actor: str
    peer: str
    entry_point: str
    operation: str
    result: str


@dataclass
class _Burst:
    """Refusals of one key since the last flush: when the first came, its message, how many."""

    time: datetime
    message: str
    count: int = 1


class AuditTrail:
    def __init__(
        self,
        store: AgentStore,
        writes: WriteBehind,
        node: str,
        clock: Clock = SYSTEM_CLOCK,
        max_pending: int = 10_000,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self._store = store
        self._writes = writes
        self._node = node
        self._clock = clock
        self._max_pending = max_pending
        self._pending: deque[AuditRecord] = deque()
        self._refusals: dict[_Key, _Burst] = {}
        self._flushing = asyncio.Lock()
        # A write under way (it outlives a cancelled flush: its records are put back if it fails).
        self._in_flight: asyncio.Task[None] | None = None
        self._in_flight_records = 0
        self._failing = False
        self._unreported_drops = 0
        # Records lost: dropped from a full queue, or refused by the store.
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Records not yet written (refusal bursts count one each)."""
        return len(self._pending) + len(self._refusals) + self._in_flight_records

    # -- taking records in (synchronous, never raise) -------------------------------------------

    def record(self, rec: AuditRecord) -> None:
        """Log the record and queue it for the next flush (its node filled in if empty)."""
        try:
            rec, parameters_text = self._normal(rec)
            fields: dict[str, Any] = {
                name: getattr(rec, name)
                for name in ("actor", "peer", "entry_point", "operation", "target", "result", "count")
            }
            if rec.message:
                fields["message"] = rec.message
            if len(parameters_text) < MAX_LOGGED_PARAMETERS:
                fields["parameters"] = rec.parameters
            else:
                fields["parameter_keys"] = sorted(rec.parameters)[:MAX_LOGGED_KEYS]
            log.info("audit", **fields)
            self._queue([rec])
        except Exception as exc:
            _never_raise("audit record not kept: it could not be read", exc)

    def refused(
        self, actor: str, peer: str, entry_point: str, operation: str, result: str, message: str
    ) -> None:
        """Count a refused request (UNAUTHENTICATED, PERMISSION_DENIED) into its burst: one
        record per key and flush, logged then with its count."""
        try:
            key = _Key(
                _text(actor, "actor"),
                _text(peer_host(_text(peer, "peer")), "peer"),
                _text(entry_point, "entry_point"),
                _text(operation, "operation"),
                _text(result, "result"),
            )
            burst = self._refusals.get(key)
            if burst is None:
                key = self._room_for(key)
                burst = self._refusals.get(key)
            if burst is None:
                self._refusals[key] = _Burst(self._clock.now().astimezone(UTC), _text(message, "message"))
            else:
                burst.count += 1
        except Exception as exc:
            _never_raise("refusal not counted in the audit trail", exc)

    def _room_for(self, key: _Key) -> _Key:
        """The key a new burst is counted under: its own while there is room, else folded."""
        if len(self._refusals) < MAX_REFUSAL_KEYS:
            return key
        folded = dataclasses.replace(key, actor=MANY, peer=MANY)
        if folded in self._refusals or len(self._refusals) < MAX_REFUSAL_KEYS + MAX_FOLDED_KEYS:
            return folded
        return _Key(MANY, MANY, MANY, MANY, MANY)

    def _normal(self, rec: AuditRecord) -> tuple[AuditRecord, str]:
        """The record with every field of its type and within its bound, and its parameters'
        JSON; TypeError for what is not an AuditRecord at all."""
        if not isinstance(rec, AuditRecord):
            raise TypeError(f"not an AuditRecord: {type(rec).__name__}")
        time = rec.time
        if not isinstance(time, datetime):
            time = self._clock.now()
        time = time.replace(tzinfo=UTC) if time.tzinfo is None else time.astimezone(UTC)
        count = rec.count if isinstance(rec.count, int) and not isinstance(rec.count, bool) else 1
        parameters, text = bounded_parameters(rec.parameters)
        normal = AuditRecord(
            time=time,
            actor=_text(rec.actor, "actor"),
            peer=_text(rec.peer, "peer"),
            entry_point=_text(rec.entry_point, "entry_point"),
            operation=_text(rec.operation, "operation"),
            target=_text(rec.target, "target"),
            parameters=parameters,
            result=_text(rec.result, "result"),
            message=_text(rec.message, "message"),
            node=_text(rec.node, "node") or _text(self._node, "node"),
            count=max(count, 1),
        )
        return normal, text

    def _queue(self, records: Sequence[AuditRecord]) -> None:
        self._pending.extend(records)
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest records past max_pending (reported at the next flush)."""
        excess = len(self._pending) - self._max_pending
        for _ in range(max(excess, 0)):
            self._pending.popleft()
        if excess > 0:
            self._unreported_drops += excess
            self.dropped += excess

    # -- writing them -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write everything pending in one store call, on the store's thread. When the store
        fails, the records are kept (bounded) for the next flush and a warning says why."""
        async with self._flushing:
            if self._in_flight is not None:  # a write a cancelled flush left: its outcome first
                await asyncio.shield(self._in_flight)
            batch = self._take()
            self._report_drops()
            if batch:
                self._in_flight = asyncio.ensure_future(self._write(batch))
                self._in_flight_records = len(batch)
                # Shielded: a flush cancelled (the manager stopping) leaves the write to finish
                # and put back what it could not write.
                await asyncio.shield(self._in_flight)

    async def close(self, timeout: float) -> None:
        """The last flush (daemon shutdown), within timeout; what could not be written is logged."""
        last = asyncio.ensure_future(self.flush())
        done, _ = await asyncio.wait({last}, timeout=timeout)
        if not done:
            last.cancel()
            log.error("the store did not take the last audit records in time", timeout=timeout)
        if self.pending:
            log.error("audit records not written at shutdown: the store is unavailable", records=self.pending)

    def _take(self) -> list[AuditRecord]:
        """Everything pending, the refusal bursts as records (each logged with its count)."""
        batch = list(self._pending)
        self._pending.clear()
        for key, burst in self._refusals.items():
            log.info(
                "audit",
                actor=key.actor,
                peer=key.peer,
                entry_point=key.entry_point,
                operation=key.operation,
                result=key.result,
                count=burst.count,
            )
            batch.append(
                AuditRecord(
                    time=burst.time,
                    actor=key.actor,
                    peer=key.peer,
                    entry_point=key.entry_point,
                    operation=key.operation,
                    target="",
                    parameters={},
                    result=key.result,
                    message=burst.message,
                    node=_text(self._node, "node"),
                    count=burst.count,
                )
            )
        self._refusals.clear()
        return batch

    def _report_drops(self) -> None:
        if self._unreported_drops:
            log.error(
                "audit records dropped: more were waiting for the store than the trail holds",
                dropped=self._unreported_drops,
                max_pending=self._max_pending,
            )
            self._unreported_drops = 0

    async def _write(self, batch: list[AuditRecord]) -> None:
        """Append the batch; what the store could not take (it failed) goes back in the queue."""
        try:
            kept = await self._append(batch)
        finally:
            self._in_flight = None
            self._in_flight_records = 0
        if kept:
            if not self._failing:
                log.warning("audit records kept for the next flush: the store failed", records=len(kept))
            self._failing = True
            self._pending.extendleft(reversed(kept))
            self._trim()
        elif self._failing:
            self._failing = False
            log.info("audit records written again", records=len(batch))

    async def _append(self, batch: list[AuditRecord]) -> list[AuditRecord]:
        """The records not written for want of a store (refused ones are dropped, logged)."""
        what = f"append {len(batch)} audit records"
        try:
            await self._writes.call(lambda: self._store.append_audit(batch), what)
            return []
        except StoreError as exc:
            if not isinstance(exc, StoreRejected):
                log.warning("audit records not written: the store failed", error=str(exc))
                return batch
            error: Exception = exc
        except Exception as exc:  # the store's thread is closed, or a bug below us
            error = exc
        # The database refused something in the batch: record by record, so that only what it
        # refuses is lost, not everything queued with it.
        log.error("the store refused audit records: written one by one", error=str(error))
        try:
            kept, refused = await self._writes.call(lambda: self._one_by_one(batch), what)
        except Exception as exc:
            log.warning("audit records not written: the store failed", error=str(exc))
            return batch
        self.dropped += refused
        return kept

    def _one_by_one(self, batch: list[AuditRecord]) -> tuple[list[AuditRecord], int]:
        """On the store's thread: each record in its own call. The records left when the store
        fails, and how many it refused."""
        refused = 0
        for index, rec in enumerate(batch):
            try:
                self._store.append_audit([rec])
                continue
            except StoreRejected as exc:
                error = str(exc)
            except StoreError:
                return batch[index:], refused
            except Exception as exc:  # a bug below us, on this record
                error = repr(exc)
            refused += 1
            log.error("audit record dropped: the store refuses it", operation=rec.operation, error=error)
        return [], refused

    # -- reading and pruning ------------------------------------------------------------------

    async def query(self, query: AuditFilter) -> list[AuditRecord]:
        """The records that match, newest first (what is pending is written first, so that what
        was just done is listed). InvalidArgument for a bad limit or before_id; Unavailable
        while the store cannot be read."""
        query = _checked(query)
        await self.flush()
        try:
            return await self._writes.call(lambda: self._store.audit_records(query), "read audit records")
        except StoreError as exc:
            raise Unavailable(f"the audit trail cannot be read: the database is unavailable: {exc}") from exc

    async def prune(self, keep: int = KEEP) -> int:
        """Delete all but the newest `keep` records (the manager's cleanup); how many went.
        A store failure is a warning: the next cleanup tries again."""
        try:
            removed = await self._writes.call(lambda: self._store.prune_audit(keep), "prune audit records")
        except StoreError as exc:
            log.warning("old audit records not pruned: the store failed", error=str(exc))
            return 0
        if removed:
            log.info("old audit records pruned", removed=removed, kept=keep)
        return removed


def peer_host(peer: str) -> str:
    """The peer without its port: "ipv4:1.2.3.4:5555" → "ipv4:1.2.3.4", "ipv6:[::1]:5555" →
    "ipv6:[::1]" (also with the brackets %-encoded); any other form as it is."""
    scheme, colon, rest = peer.partition(":")
    if scheme == "ipv4" and colon:
        host, sep, port = rest.rpartition(":")
        return f"ipv4:{host}" if sep and port.isdigit() else peer
    if scheme == "ipv6" and colon:
        for bracket in ("]", "%5D", "%5d"):
            end = rest.rfind(bracket)
            if end >= 0:
                return f"ipv6:{rest[: end + len(bracket)]}"
    return peer


def bounded_parameters(parameters: object) -> tuple[dict[str, Any], str]:
    """The parameters as plain JSON values (a copy), and their compact JSON, at most
    MAX_PARAMETERS_BYTES: past it {"truncated": true} with as many fields (in key order) as fit
    (the store's rule too)."""
    if not isinstance(parameters, dict):
        parameters = {} if parameters is None else {"value": parameters}
    parameters = {str(key): value for key, value in parameters.items()}  # as JSON would name them
    try:
        text = _json(parameters)
    except (TypeError, ValueError, RecursionError):
        text = None
    if text is None or len(text) > MAX_PARAMETERS_BYTES:
        kept: dict[str, Any] = {"truncated": True}
        size = len(_json(kept))
        for key in sorted(parameters, key=str):
            name = str(key)
            try:
                field = f"{_json(name)}:{_json(parameters[key])}"
            except (TypeError, ValueError, RecursionError):
                continue
            if name not in kept and size + 1 + len(field) <= MAX_PARAMETERS_BYTES:
                kept[name] = parameters[key]
                size += 1 + len(field)
        text = _json(kept)
    copied: dict[str, Any] = json.loads(text)
    return copied, text


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _text(value: object, field: str) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text[: WIDTHS[field]]


def _checked(query: AuditFilter) -> AuditFilter:
    """The query, its since in UTC; InvalidArgument naming each bad field."""
    violations: list[FieldViolation] = []
    limit, before_id, since = query.limit, query.before_id, query.since
    if not _is_int(limit) or not 1 <= limit <= MAX_QUERY_LIMIT:
        violations.append(FieldViolation("limit", f"must be 1-{MAX_QUERY_LIMIT}, not {limit!r}"))
    if before_id is not None and (not _is_int(before_id) or before_id < 1):
        violations.append(FieldViolation("before_id", f"must be at least 1, not {before_id!r}"))
    if since is not None and not isinstance(since, datetime):
        violations.append(FieldViolation("since", "must be a time"))
    for name in ("target", "actor"):
        if not isinstance(getattr(query, name), str):
            violations.append(FieldViolation(name, "must be text"))
    if violations:
        raise InvalidArgument(violations)
    if since is not None:
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
        query = dataclasses.replace(query, since=since)
    return query


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _never_raise(event: str, exc: Exception) -> None:
    with contextlib.suppress(Exception):
        log.error(event, error=repr(exc)[:MAX_MESSAGE])
