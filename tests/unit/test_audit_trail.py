"""AuditTrail over MemoryStore and a fake clock: records kept and listed newest first, filters
and their bounds, refusal floods folded into counted records, a bounded queue that says what it
dropped, store failures survived, and nothing a caller hands over makes it raise."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, MutableMapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from opmasd.core.audit import MAX_MESSAGE, MAX_PARAMETERS_BYTES, MAX_TARGET, AuditFilter, AuditRecord
from opmasd.core.errors import InvalidArgument, StoreError, StoreRejected, Unavailable
from opmasd.manager import AgentManager, AuditTrail, ManagerSettings
from opmasd.manager import audit as audit_module
from opmasd.manager.audit import MANY, MAX_REFUSAL_KEYS, bounded_parameters, peer_host
from opmasd.manager.persistence import WriteBehind
from opmasd.testing.clock import FakeClock
from opmasd.testing.fake_runtime import FakeRuntime
from opmasd.testing.memory_store import MemoryStore

NODE = "n1"


@dataclass
class Parts:
    trail: AuditTrail
    store: MemoryStore
    clock: FakeClock
    writes: WriteBehind


async def make(store: MemoryStore | None = None, max_pending: int = 10_000) -> Parts:
    store = store or MemoryStore()
    clock = FakeClock()
    writes = WriteBehind(store, clock)
    return Parts(AuditTrail(store, writes, NODE, clock, max_pending=max_pending), store, clock, writes)


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    made = await make()
    yield made
    await made.writes.close(1.0)


def rec(n: int = 0, clock: FakeClock | None = None, **fields: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "time": (clock.now() if clock else datetime(2026, 1, 1, tzinfo=UTC)) + timedelta(seconds=n),
        "actor": "token:0123456789abcdef",
        "peer": "ipv4:10.0.0.1:40000",
        "entry_point": "grpc",
        "operation": "StopAgent",
        "target": f"agent-{n}",
        "parameters": {"agent_id": f"agent-{n}", "timeout": 5},
        "result": "OK",
    }
    values.update(fields)
    return AuditRecord(**values)


def audit_lines(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "audit"]


# -- recording and listing ---------------------------------------------------------------------


async def test_a_record_is_listed_after_it_is_kept_newest_first(parts: Parts) -> None:
    parts.trail.record(rec(1))
    parts.trail.record(rec(2, message="", node="other-node"))
    assert parts.store.audit == []  # nothing written before a flush
    await parts.trail.flush()
    listed = await parts.trail.query(AuditFilter())
    assert [r.target for r in listed] == ["agent-2", "agent-1"]
    assert [r.id for r in listed] == [2, 1]
    assert listed[1] == replace(rec(1), node=NODE)  # the node filled in when empty
    assert listed[0].node == "other-node"  # kept when given
    assert listed[1].parameters == {"agent_id": "agent-1", "timeout": 5}


async def test_a_query_writes_what_is_pending_first(parts: Parts) -> None:
    parts.trail.record(rec(1))
    assert [r.target for r in await parts.trail.query(AuditFilter())] == ["agent-1"]
    assert parts.trail.pending == 0


async def test_record_logs_one_line_with_small_parameters_and_only_the_keys_of_large_ones(
    parts: Parts,
) -> None:
    large = {"agent_id": "a", "spec": {"command": ["x" * 600]}}
    with capture_logs() as logs:
        parts.trail.record(rec(1))
        parts.trail.record(rec(2, parameters=large, result="NOT_FOUND", message="no such agent"))
    small_line, large_line = audit_lines(logs)
    assert small_line["log_level"] == "info"
    assert {k: small_line[k] for k in ("actor", "peer", "entry_point", "operation", "target", "result")} == {
        "actor": "token:0123456789abcdef",
        "peer": "ipv4:10.0.0.1:40000",
        "entry_point": "grpc",
        "operation": "StopAgent",
        "target": "agent-1",
        "result": "OK",
    }
    assert small_line["count"] == 1
    assert small_line["parameters"] == {"agent_id": "agent-1", "timeout": 5}
    assert "parameters" not in large_line and large_line["parameter_keys"] == ["agent_id", "spec"]
    assert large_line["message"] == "no such agent"
    assert "x" * 600 not in repr(logs)


async def test_a_caller_mutating_its_parameters_afterwards_changes_nothing_kept(parts: Parts) -> None:
    parameters: dict[str, Any] = {"agent_id": "a", "labels": {"k": "v"}}
    parts.trail.record(rec(1, parameters=parameters))
    parameters["labels"]["k"] = "changed"
    [listed] = await parts.trail.query(AuditFilter())
    assert listed.parameters == {"agent_id": "a", "labels": {"k": "v"}}


async def test_filters_by_target_actor_since_and_before_id(parts: Parts) -> None:
    for n in range(6):
        actor = "local" if n % 2 else "token:0123456789abcdef"
        parts.trail.record(rec(n, actor=actor, target="a" if n < 3 else "b"))
    await parts.trail.flush()

    async def ids(**query: Any) -> list[int | None]:
        return [r.id for r in await parts.trail.query(AuditFilter(**query))]

    assert await ids() == [6, 5, 4, 3, 2, 1]
    assert await ids(target="a") == [3, 2, 1]
    assert await ids(actor="local") == [6, 4, 2]
    assert await ids(target="b", actor="local") == [6, 4]
    t0 = rec(0).time
    assert await ids(since=t0 + timedelta(seconds=4)) == [6, 5]
    # A naive time is taken to be UTC; another zone is the same instant.
    assert await ids(since=(t0 + timedelta(seconds=4)).replace(tzinfo=None)) == [6, 5]
    assert await ids(before_id=4) == [3, 2, 1]
    assert await ids(before_id=4, limit=2) == [3, 2]
    assert await ids(before_id=1) == []
    assert await ids(target="nothing") == []
    assert await ids(limit=1) == [6]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (AuditFilter(limit=0), "limit"),
        (AuditFilter(limit=-1), "limit"),
        (AuditFilter(limit=1001), "limit"),
        (AuditFilter(limit=True), "limit"),
        (AuditFilter(limit="10"), "limit"),  # type: ignore[arg-type]
        (AuditFilter(before_id=0), "before_id"),
        (AuditFilter(before_id=-5), "before_id"),
        (AuditFilter(since="yesterday"), "since"),  # type: ignore[arg-type]
        (AuditFilter(target=None), "target"),  # type: ignore[arg-type]
    ],
)
async def test_query_bounds_are_invalid_arguments_naming_the_field(
    parts: Parts, query: AuditFilter, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await parts.trail.query(query)
    assert [v.field for v in caught.value.violations] == [field]


async def test_the_limits_themselves_are_accepted(parts: Parts) -> None:
    for n in range(3):
        parts.trail.record(rec(n))
    assert len(await parts.trail.query(AuditFilter(limit=1))) == 1
    assert len(await parts.trail.query(AuditFilter(limit=1000))) == 3
    assert len(await parts.trail.query(AuditFilter(before_id=1))) == 0


# -- refusals ------------------------------------------------------------------------------------


async def test_a_flood_of_refusals_from_one_peer_is_one_record_with_its_count(parts: Parts) -> None:
    with capture_logs() as during:
        for n in range(10_000):
            port = 1024 + n % 60_000
            parts.trail.refused(
                "anonymous", f"ipv4:203.0.113.9:{port}", "grpc", "StopAgent", "UNAUTHENTICATED", "no token"
            )
    assert audit_lines(during) == []  # nothing per request
    with capture_logs() as flushing:
        await parts.trail.flush()
    [line] = audit_lines(flushing)
    assert (line["peer"], line["count"], line["result"]) == ("ipv4:203.0.113.9", 10_000, "UNAUTHENTICATED")
    [kept] = parts.store.audit
    assert kept == AuditRecord(
        time=parts.clock.now(),
        actor="anonymous",
        peer="ipv4:203.0.113.9",
        entry_point="grpc",
        operation="StopAgent",
        target="",
        parameters={},
        result="UNAUTHENTICATED",
        message="no token",
        node=NODE,
        count=10_000,
    )
    # The next burst of the same key is a record of its own.
    parts.trail.refused("anonymous", "ipv4:203.0.113.9:1", "grpc", "StopAgent", "UNAUTHENTICATED", "")
    await parts.trail.flush()
    assert [r.count for r in await parts.trail.query(AuditFilter())] == [1, 10_000]


async def test_refusals_are_counted_per_actor_peer_entry_point_operation_and_result(parts: Parts) -> None:
    refusals = [
        ("anonymous", "ipv6:[::1]:5555", "grpc", "StopAgent", "UNAUTHENTICATED"),
        ("anonymous", "ipv6:[::1]:6666", "grpc", "StopAgent", "UNAUTHENTICATED"),  # same host
        ("anonymous", "ipv6:[::2]:5555", "grpc", "StopAgent", "UNAUTHENTICATED"),
        ("token:aaaaaaaaaaaaaaaa", "ipv6:[::1]:5555", "grpc", "StopAgent", "PERMISSION_DENIED"),
        ("anonymous", "ipv6:[::1]:5555", "rest", "StopAgent", "UNAUTHENTICATED"),
        ("anonymous", "ipv6:[::1]:5555", "grpc", "StartAgent", "UNAUTHENTICATED"),
        ("anonymous", "nats:", "nats", "StartAgent", "UNAUTHENTICATED"),
        ("anonymous", "nats:", "nats", "StartAgent", "UNAUTHENTICATED"),
    ]
    for refusal in refusals:
        parts.trail.refused(*refusal, "refused")
    await parts.trail.flush()
    counts = {(r.actor, r.peer, r.entry_point, r.operation, r.result): r.count for r in parts.store.audit}
    assert counts == {
        ("anonymous", "ipv6:[::1]", "grpc", "StopAgent", "UNAUTHENTICATED"): 2,
        ("anonymous", "ipv6:[::2]", "grpc", "StopAgent", "UNAUTHENTICATED"): 1,
        ("token:aaaaaaaaaaaaaaaa", "ipv6:[::1]", "grpc", "StopAgent", "PERMISSION_DENIED"): 1,
        ("anonymous", "ipv6:[::1]", "rest", "StopAgent", "UNAUTHENTICATED"): 1,
        ("anonymous", "ipv6:[::1]", "grpc", "StartAgent", "UNAUTHENTICATED"): 1,
        ("anonymous", "nats:", "nats", "StartAgent", "UNAUTHENTICATED"): 2,
    }


async def test_more_distinct_refusals_than_the_bound_fold_into_many(parts: Parts) -> None:
    for n in range(MAX_REFUSAL_KEYS + 500):
        peer = f"ipv4:10.{n // 65536}.{n // 256 % 256}.{n % 256}:1"
        parts.trail.refused("anonymous", peer, "grpc", "X", "UNAUTHENTICATED", "")
    # Again from the first peers: their keys are kept, so these count there.
    for n in range(10):
        parts.trail.refused("anonymous", f"ipv4:10.0.0.{n}:2", "grpc", "X", "UNAUTHENTICATED", "")
    assert parts.trail.pending == MAX_REFUSAL_KEYS + 1
    await parts.trail.flush()
    records = parts.store.audit
    assert len(records) == MAX_REFUSAL_KEYS + 1
    [folded] = [r for r in records if r.actor == MANY]
    assert (folded.peer, folded.operation, folded.count) == (MANY, "X", 500)
    assert sum(r.count for r in records) == MAX_REFUSAL_KEYS + 510
    assert {r.count for r in records if r.peer == "ipv4:10.0.0.3"} == {2}


async def test_the_folded_keys_are_bounded_too(parts: Parts) -> None:
    for n in range(MAX_REFUSAL_KEYS):
        parts.trail.refused(f"token:{n:016x}", "unix:", "grpc", "X", "UNAUTHENTICATED", "")
    # Operation names a caller may choose (an unknown method): past the folded keys' bound, one key.
    for n in range(5000):
        parts.trail.refused("anonymous", "unix:", "grpc", f"Op{n}", "UNAUTHENTICATED", "")
    assert parts.trail.pending == MAX_REFUSAL_KEYS + audit_module.MAX_FOLDED_KEYS + 1
    await parts.trail.flush()
    [everything] = [r for r in parts.store.audit if r.operation == MANY]
    assert (everything.actor, everything.peer, everything.entry_point, everything.result) == (MANY,) * 4
    assert everything.count == 5000 - audit_module.MAX_FOLDED_KEYS


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:1.2.3.4:5555", "ipv4:1.2.3.4"),
        ("ipv6:[::1]:5555", "ipv6:[::1]"),
        ("ipv6:[2001:db8::7]:443", "ipv6:[2001:db8::7]"),
        ("ipv6:%5B::1%5D:5555", "ipv6:%5B::1%5D"),
        ("ipv4:1.2.3.4", "ipv4:1.2.3.4"),
        ("unix:", "unix:"),
        ("unix:/run/opmas/opmasd.sock", "unix:/run/opmas/opmasd.sock"),
        ("nats:", "nats:"),
        ("", ""),
        ("ipv4:", "ipv4:"),
    ],
)
def test_peer_host_strips_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# -- the queue's bound and store failures --------------------------------------------------------


async def test_a_full_queue_drops_the_oldest_and_says_how_many() -> None:
    parts = await make(max_pending=5)
    try:
        with capture_logs() as logs:
            for n in range(8):
                parts.trail.record(rec(n))
            assert parts.trail.pending == 5
            await parts.trail.flush()
        [error] = [e for e in logs if e["log_level"] == "error"]
        assert error["dropped"] == 3 and error["max_pending"] == 5
        assert [r.target for r in parts.store.audit] == [f"agent-{n}" for n in range(3, 8)]
        assert parts.trail.dropped == 3
        # Reported once: the next flush has nothing more to say.
        with capture_logs() as later:
            await parts.trail.flush()
        assert [e for e in later if e["log_level"] == "error"] == []
    finally:
        await parts.writes.close(1.0)


async def test_a_store_failure_keeps_the_records_for_a_later_flush(parts: Parts) -> None:
    parts.trail.record(rec(1))
    parts.trail.refused("anonymous", "ipv4:10.0.0.1:1", "grpc", "StopAgent", "UNAUTHENTICATED", "")
    parts.store.failure = StoreError("database is locked")
    with capture_logs() as logs:
        await parts.trail.flush()  # does not raise
        parts.trail.record(rec(2))
        await parts.trail.flush()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any("store failed" in e["event"] for e in warnings)
    assert parts.trail.pending == 3
    parts.store.failure = None
    with capture_logs() as recovered:
        await parts.trail.flush()
    assert any(e["event"] == "audit records written again" for e in recovered)
    assert [(r.target, r.count) for r in parts.store.audit] == [("agent-1", 1), ("", 1), ("agent-2", 1)]
    assert parts.trail.pending == 0 and parts.trail.dropped == 0


async def test_records_kept_through_a_failure_stay_within_the_bound() -> None:
    parts = await make(max_pending=4)
    try:
        parts.store.failure = StoreError("gone")
        for n in range(3):
            parts.trail.record(rec(n))
        await parts.trail.flush()
        for n in range(3, 6):
            parts.trail.record(rec(n))
        assert parts.trail.pending == 4
        parts.store.failure = None
        await parts.trail.flush()
        assert [r.target for r in parts.store.audit] == [f"agent-{n}" for n in range(2, 6)]
        assert parts.trail.dropped == 2
    finally:
        await parts.writes.close(1.0)


async def test_a_record_the_store_refuses_is_dropped_alone() -> None:
    class Refusing(MemoryStore):
        def append_audit(self, records: Sequence[AuditRecord]) -> None:
            if any(r.operation == "Poison" for r in records):
                raise StoreRejected("value too long")
            super().append_audit(records)

    parts = await make(Refusing())
    try:
        parts.trail.record(rec(1))
        parts.trail.record(rec(2, operation="Poison"))
        parts.trail.record(rec(3))
        with capture_logs() as logs:
            await parts.trail.flush()
        assert [r.target for r in parts.store.audit] == ["agent-1", "agent-3"]
        assert parts.trail.dropped == 1 and parts.trail.pending == 0
        assert any(e["event"] == "audit record dropped: the store refuses it" for e in logs)
    finally:
        await parts.writes.close(1.0)


async def test_a_flush_cancelled_during_its_write_loses_nothing() -> None:
    release = threading.Event()

    class Slow(MemoryStore):
        def append_audit(self, records: Sequence[AuditRecord]) -> None:
            release.wait(5)
            super().append_audit(records)  # fails while self.failure is set

    parts = await make(Slow())
    try:
        parts.trail.record(rec(1))
        flushing = asyncio.ensure_future(parts.trail.flush())
        await asyncio.sleep(0.05)
        flushing.cancel()
        parts.store.failure = StoreError("gone")
        release.set()
        await asyncio.gather(flushing, return_exceptions=True)
        parts.trail.record(rec(2))
        parts.store.failure = None
        await parts.trail.flush()  # waits for the cancelled write, which put its record back
        assert [r.target for r in parts.store.audit] == ["agent-1", "agent-2"]
    finally:
        release.set()
        await parts.writes.close(1.0)


async def test_a_query_while_the_store_is_down_is_unavailable(parts: Parts) -> None:
    parts.trail.record(rec(1))
    parts.store.failure = StoreError("connection refused")
    with pytest.raises(Unavailable) as caught:
        await parts.trail.query(AuditFilter())
    assert caught.value.message == (
        "the audit trail cannot be read: the database is unavailable: connection refused"
    )
    assert parts.trail.pending == 1  # still kept


async def test_prune_keeps_the_newest_and_survives_a_store_failure(parts: Parts) -> None:
    for n in range(5):
        parts.trail.record(rec(n))
    await parts.trail.flush()
    with capture_logs() as logs:
        assert await parts.trail.prune(keep=2) == 3
    assert [e["removed"] for e in logs if e["event"] == "old audit records pruned"] == [3]
    assert [r.target for r in await parts.trail.query(AuditFilter())] == ["agent-4", "agent-3"]
    assert await parts.trail.prune(keep=2) == 0
    parts.store.failure = StoreError("gone")
    assert await parts.trail.prune(keep=0) == 0


# -- odd input -----------------------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _cyclic() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return {"agent_id": "a", "loop": loop}


ODD_RECORDS: list[Any] = [
    None,
    "StopAgent",
    42,
    {"actor": "x"},
    rec(1, time=None),
    rec(1, time="yesterday"),
    rec(1, time=datetime(2026, 1, 1)),  # naive: taken as UTC
    rec(1, actor=None, peer=None, target=None, message=None, node=None),
    rec(1, actor=b"bytes", operation=17, result=("OK",)),
    rec(1, parameters=None),
    rec(1, parameters="not a dict"),
    rec(1, parameters=["a", "list"]),
    rec(1, parameters={"when": datetime(2026, 1, 1), "obj": object(), 3: "int key", None: "none key"}),
    rec(1, parameters=_cyclic()),
    rec(1, parameters={"blob": "x" * 1_000_000, "agent_id": "a"}),
    rec(1, parameters={f"k{n:05}": n for n in range(10_000)}),
    rec(1, parameters={"bad": Unprintable()}),
    rec(1, count="many"),
    rec(1, count=True),
    rec(1, count=-3),
    rec(1, count=10**30),
    rec(1, target="t" * 1_000_000, message="m" * 1_000_000, actor="a\x00b\ud800"),
]


@pytest.mark.parametrize("odd", ODD_RECORDS, ids=range(len(ODD_RECORDS)))
async def test_record_never_raises_and_what_it_keeps_is_bounded(parts: Parts, odd: Any) -> None:
    parts.trail.record(odd)
    await parts.trail.flush()
    for kept in parts.store.audit:
        assert isinstance(kept.time, datetime) and kept.time.tzinfo is not None
        assert len(kept.target) <= MAX_TARGET and len(kept.message) <= MAX_MESSAGE
        texts = ("actor", "peer", "entry_point", "operation", "result", "node")
        assert all(isinstance(getattr(kept, name), str) for name in texts)
        assert isinstance(kept.count, int) and kept.count >= 1
        assert len(json.dumps(kept.parameters, sort_keys=True, separators=(",", ":"))) <= MAX_PARAMETERS_BYTES


async def test_refused_never_raises(parts: Parts) -> None:
    odd: list[Any] = [None, 42, b"x", Unprintable(), "z" * 1_000_000]
    for value in odd:
        parts.trail.refused(value, value, value, value, value, value)
    await parts.trail.flush()
    assert all(len(r.peer) <= 160 and len(r.message) <= MAX_MESSAGE for r in parts.store.audit)


def test_bounded_parameters_keep_the_first_fields_that_fit_as_valid_json() -> None:
    small, text = bounded_parameters({"b": 1, "a": [1, 2]})
    assert (small, text) == ({"a": [1, 2], "b": 1}, '{"a":[1,2],"b":1}')
    big = {"a": "x" * 100, "b": "y" * MAX_PARAMETERS_BYTES, "c": 3}
    kept, text = bounded_parameters(big)
    assert kept == {"truncated": True, "a": "x" * 100, "c": 3}
    assert json.loads(text) == kept and len(text) <= MAX_PARAMETERS_BYTES


# -- in the manager ------------------------------------------------------------------------------


async def test_the_manager_flushes_every_second_and_at_stop_and_prunes_at_cleanup() -> None:
    store = MemoryStore()
    manager = AgentManager(store, FakeRuntime(), ManagerSettings(node=NODE, monitoring_interval=60))
    await manager.start(discover=False)
    try:
        assert isinstance(manager.audit, AuditTrail)
        manager.audit.record(rec(1, node=""))
        for _ in range(40):  # the flush job runs every second (real time)
            if store.audit:
                break
            await asyncio.sleep(0.05)
        assert [(r.target, r.node) for r in store.audit] == [("agent-1", NODE)]
        # The cleanup prunes the audit trail to its newest KEEP records.
        store.append_audit([rec(0)] * (audit_module.KEEP + 3))
        with capture_logs() as logs:
            await manager._cleanup()
        assert [e["removed"] for e in logs if e["event"] == "old audit records pruned"] == [4]
        assert len(store.audit) == audit_module.KEEP
        manager.audit.record(rec(2))
        assert manager.audit.pending == 1  # left to the last flush
    finally:
        await manager.stop(stop_agents=False)
    assert store.audit[-1].target == "agent-2"  # the last flush, at stop
