"""FleetStore: the AgentStore on a PostgreSQL the fleet shares, with this node's own copy in SQLite.

A node must run its agents whether or not PostgreSQL answers: started while it is down, or
running on while it is away, opmasd needs the rows of its own agents (specs, desired states,
PIDs to re-adopt). So every write of this node's agents lands in a SQLite copy in the state
directory as well, and the copy is what a node falls back on.

How the two relate, and which wins:
- **What operators decide** (registration, spec, desired state, deletion) is committed in the
  copy and then in PostgreSQL (`commit_rows`), and acknowledged only once both have it; while
  PostgreSQL is away operators' changes are refused (UNAVAILABLE, the copy put back), never
  kept on one node only. At start, PostgreSQL's intent wins over the copy's.
- **What the node observes** (state, PID, exits, restarts, heartbeats) is written to the copy
  first (`write_batch`), then to PostgreSQL. While PostgreSQL is away it stays in the copy and
  in a bounded list of unsent rows, and is written to PostgreSQL when it is back (`sync`). At
  start, the copy's observations win over PostgreSQL's: this node is their only writer, and
  the copy always has them first.
- Started while PostgreSQL is down, a node runs from its copy alone; everything it loaded is
  written to PostgreSQL once it is reachable.
- **API tokens** are the fleet's: they live in PostgreSQL alone (never in the copy), so they
  are created, revoked and read only while it answers.
- **The audit trail** is the fleet's too: written, read and pruned in PostgreSQL alone, so
  while it is away the manager keeps the records it has not written (bounded) and retries.

Connection attempts while PostgreSQL is away back off (1 s doubling to 5 s), so writes to the
copy are not held up by a connect timeout at every flush.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import structlog

from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.core.auth import ApiToken
from opmasd.core.errors import StoreDegraded, StoreError, StoreRejected
from opmasd.core.model import AgentRecord, Transition
from opmasd.core.urls import redacted
from opmasd.store.sql import SqlStore

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Observed fields: the node's copy wins for these at start (see the module's doc).
OBSERVED = (
    "state",
    "state_reason",
    "state_changed_at",
    "pid",
    "pid_start_time",
    "started_at",
    "restart_count",
    "consecutive_failures",
    "last_exit",
    "last_heartbeat",
    "next_restart_at",
)
# Transitions kept for PostgreSQL while it is away (the copy keeps them all).
MAX_UNSENT_TRANSITIONS = 100_000
RETRY_INITIAL = 1.0
# Short: operators' changes are refused while PostgreSQL is not tried again.
RETRY_MAX = 5.0


class FleetStore:
    """Build it with FleetStore.open(url, node, copy_path)."""

    def __init__(self, url: str, node: str, copy: SqlStore, pool_size: int) -> None:
        self._url = url
        self._node = node
        self._copy = copy
        self._pool_size = pool_size
        self._shared: SqlStore | None = None
        # Rows and transitions PostgreSQL does not have yet (newest row per agent).
        self._unsent: dict[str, AgentRecord] = {}
        self._unsent_transitions: deque[Transition] = deque(maxlen=MAX_UNSENT_TRANSITIONS)
        self._unsent_removals: dict[str, datetime] = {}
        self._mine: set[str] = set()
        # Whether PostgreSQL may lack transitions the copy has from before this start.
        self._history_behind = False
        self._retry_at = 0.0
        self._retry_delay = RETRY_INITIAL
        self._last_error = ""

    @classmethod
    def open(cls, url: str, node: str, copy_path: Path, *, pool_size: int = 5) -> FleetStore:
        """Open the node's copy (StoreError if that fails: without it nothing is safe) and try
        PostgreSQL once; unreachable, it is tried again at later writes."""
        copy = SqlStore.open(f"sqlite:///{copy_path}")
        store = cls(url, node, copy, pool_size)
        try:
            store._connected()
        except StoreError as exc:
            log.warning(
                "PostgreSQL unreachable: this node runs its agents from its own copy until it is back",
                url=redacted(url),
                copy=str(copy_path),
                error=str(exc),
            )
        return store

    # -- the AgentStore protocol --------------------------------------------------------------

    def load_agents(self) -> list[AgentRecord]:
        copied = self._copy.load_agents()
        self._mine = {rec.agent_id for rec in copied if rec.node == self._node}
        try:
            shared = self._connected().load_agents()
        except StoreError as exc:
            self._failed(exc)
            log.warning("agents loaded from this node's copy: PostgreSQL is unreachable", agents=len(copied))
            self._unsent.update({rec.agent_id: rec for rec in copied})
            self._history_behind = True
            return copied
        merged, changed = _merge(shared, copied, self._node)
        self._mine = {rec.agent_id for rec in merged if rec.node == self._node}
        self._copy.write_batch([rec for rec in merged if rec.node == self._node], ())
        self._history_behind = True
        if changed:
            log.info("PostgreSQL brought up to date from this node's copy", agents=len(changed))
            self._unsent.update({rec.agent_id: rec for rec in changed})
        self._send_unsent_quietly()
        return merged

    def commit_rows(self, records: Sequence[AgentRecord]) -> None:
        """The copy, then PostgreSQL: an operator's change is acknowledged only once both have
        it (a node that starts from its copy must never run on less than it acknowledged).
        StoreError when either cannot take it; the copy is then put back as it was."""
        if not records:
            return
        mine = [rec for rec in records if rec.node == self._node]
        before = self._copy.rows_of([rec.agent_id for rec in mine])
        self._copy.commit_rows(mine)
        try:
            self._connected().commit_rows(records)
        except StoreError as exc:
            self._failed(exc)
            self._put_back(before, mine)
            raise
        self._note_mine(mine)
        self._recovered()
        for rec in records:
            # Newer than any unsent row of the same agent: that one must not overwrite it.
            self._unsent.pop(rec.agent_id, None)

    def _put_back(self, before: Mapping[str, AgentRecord], written: Sequence[AgentRecord]) -> None:
        """Undo a commit in the copy that PostgreSQL refused: rows as they were, new ones gone."""
        try:
            self._copy.commit_rows(list(before.values()))
            self._copy.remove_rows({r.agent_id: r.created_at for r in written if r.agent_id not in before})
        except StoreError as exc:
            # The manager's undo writes the rows it restores through write_batch as well.
            log.error("this node's copy could not be put back after a refused commit", error=str(exc))

    def write_batch(self, records: Sequence[AgentRecord], transitions: Sequence[Transition]) -> None:
        """The copy first (StoreError if it fails: then nothing was written), then PostgreSQL;
        StoreDegraded when only the copy has it (kept and sent later: not to be written again)."""
        mine = self._note_mine(records)
        self._copy.write_batch(mine, [t for t in transitions if t.agent_id in self._mine])
        self._unsent.update({rec.agent_id: rec for rec in records})
        self._unsent_transitions.extend(transitions)
        self._send_unsent()

    def remove_rows(self, created: Mapping[str, datetime]) -> None:
        """From the copy, then PostgreSQL; StoreDegraded when only the copy did it (the rest is
        done when PostgreSQL is back)."""
        self._copy.remove_rows(created)
        self._unsent_removals.update(created)
        for agent_id in created:
            self._unsent.pop(agent_id, None)
        self._send_unsent()

    def sync(self) -> None:
        self._send_unsent()

    def save_heartbeats(self, last_seen: Mapping[str, datetime]) -> None:
        self._copy.save_heartbeats({a: t for a, t in last_seen.items() if a in self._mine})
        try:
            self._connected().save_heartbeats(last_seen)
        except StoreError as exc:
            self._failed(exc)
            # The copy has them; the rows sent when PostgreSQL is back carry them too.
            raise StoreDegraded(f"heartbeat times kept in this node's copy: {exc}") from exc

    def transitions(self, agent_id: str, limit: int = 100) -> list[Transition]:
        try:
            return self._connected().transitions(agent_id, limit)
        except StoreError as exc:
            self._failed(exc)
            return self._copy.transitions(agent_id, limit)

    def prune_transitions(self, keep_per_agent: int) -> int:
        removed = self._copy.prune_transitions(keep_per_agent)
        try:
            return self._connected().prune_transitions(keep_per_agent)
        except StoreError as exc:
            self._failed(exc)
            return removed

    def load_tokens(self) -> list[ApiToken]:
        """From PostgreSQL only (tokens are the fleet's, not kept in the copy): StoreError while
        it is unreachable."""
        try:
            tokens = self._connected().load_tokens()
        except StoreError as exc:
            self._failed(exc)
            raise
        self._recovered()
        return tokens

    def save_token(self, token: ApiToken) -> None:
        """To PostgreSQL only: StoreError while it is unreachable (nothing is kept to send later)."""
        try:
            self._connected().save_token(token)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._recovered()

    def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """To PostgreSQL only: StoreError while it is unreachable (the caller keeps them)."""
        self._shared_only(lambda shared: shared.append_audit(records))

    def audit_records(self, query: AuditFilter) -> list[AuditRecord]:
        """From PostgreSQL only: StoreError while it is unreachable."""
        return self._shared_only(lambda shared: shared.audit_records(query))

    def prune_audit(self, keep: int) -> int:
        """In PostgreSQL only: StoreError while it is unreachable."""
        return self._shared_only(lambda shared: shared.prune_audit(keep))

    def close(self) -> None:
        if self._unsent or self._unsent_transitions:
            log.warning(
                "PostgreSQL lacks changes this node's copy has; they are written at the next start",
                rows=len(self._unsent),
                transitions=len(self._unsent_transitions),
            )
        if self._shared is not None:
            self._shared.close()
        self._copy.close()

    # -- PostgreSQL, when it answers ----------------------------------------------------------

    def _connected(self) -> SqlStore:
        """The PostgreSQL store; StoreError while it is unreachable (tried again after a delay)."""
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise _NotYet(f"PostgreSQL is unreachable ({self._last_error}); next try in {wait:.1f}s")
        if self._shared is None:
            try:
                self._shared = SqlStore.open(self._url, pool_size=self._pool_size)
            except StoreError as exc:
                self._failed(exc)
                raise
            log.info("PostgreSQL reachable", url=redacted(self._url))
        return self._shared

    def _shared_only(self, call: Callable[[SqlStore], T]) -> T:
        """A call of what PostgreSQL alone keeps; StoreError while it is unreachable."""
        try:
            result = call(self._connected())
        except StoreError as exc:
            self._failed(exc)
            raise
        self._recovered()
        return result

    def _send_unsent(self) -> None:
        if not (self._unsent or self._unsent_transitions or self._unsent_removals or self._history_behind):
            return
        rows, transitions = list(self._unsent.values()), list(self._unsent_transitions)
        try:
            shared = self._connected()
            if self._unsent_removals:
                shared.remove_rows(self._unsent_removals)
                self._unsent_removals.clear()
            if self._history_behind:
                # The transitions an earlier opmasd observed but never sent (it stopped while
                # PostgreSQL was away): the copy has them all; they go before the newer ones.
                theirs = shared.newest_transition_times()
                ours = self._copy.newest_transition_times()
                behind = {
                    agent_id: theirs.get(agent_id)
                    for agent_id, newest in ours.items()
                    if agent_id in self._mine and (agent_id not in theirs or newest > theirs[agent_id])
                }
                others = [t for t in transitions if t.agent_id not in self._mine]  # not in the copy
                transitions = [*self._copy.transitions_after(behind), *others]
            shared.write_batch(rows, transitions)
        except StoreRejected as exc:
            # The API checks every value against both databases' limits: this should not be.
            log.error("PostgreSQL refused rows this node's copy took; they stay in the copy", error=str(exc))
            self._unsent.clear()
            self._unsent_transitions.clear()
            self._history_behind = False
            return
        except StoreError as exc:
            self._failed(exc)
            raise StoreDegraded(f"written to this node's copy only: {exc}") from exc
        self._unsent.clear()
        self._unsent_transitions.clear()
        self._history_behind = False
        self._recovered()

    def _send_unsent_quietly(self) -> None:
        try:
            self._send_unsent()
        except StoreDegraded as exc:
            log.warning("PostgreSQL not brought up to date yet; will retry", error=str(exc))

    def _note_mine(self, records: Sequence[AgentRecord]) -> list[AgentRecord]:
        mine = [rec for rec in records if rec.node == self._node]
        self._mine.update(rec.agent_id for rec in mine)
        return mine

    def _failed(self, exc: StoreError) -> None:
        if isinstance(exc, StoreRejected | _NotYet):
            return
        self._last_error = str(exc)
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _recovered(self) -> None:
        if self._retry_delay > RETRY_INITIAL:
            log.info("PostgreSQL answers again", url=redacted(self._url))
        self._retry_delay = RETRY_INITIAL
        self._retry_at = 0.0


class _NotYet(StoreError):
    """PostgreSQL failed a moment ago: not tried again before its retry delay is over."""


def _merge(
    shared: list[AgentRecord], copied: list[AgentRecord], node: str
) -> tuple[list[AgentRecord], list[AgentRecord]]:
    """PostgreSQL's rows with this node's observations from its copy; also the rows that
    changed (PostgreSQL lacks them or their observations)."""
    merged = {rec.agent_id: rec for rec in shared}
    changed: list[AgentRecord] = []
    for mine in copied:
        if mine.node != node:
            continue
        theirs = merged.get(mine.agent_id)
        if theirs is None:
            # Known here only: registered by discovery while PostgreSQL was away.
            merged[mine.agent_id] = mine
            changed.append(mine)
            continue
        observed = {name: getattr(mine, name) for name in OBSERVED}
        if any(getattr(theirs, name) != value for name, value in observed.items()):
            updated = dataclasses.replace(
                theirs, **observed, updated_at=max(theirs.updated_at, mine.updated_at)
            )
            merged[mine.agent_id] = updated
            changed.append(updated)
    return sorted(merged.values(), key=lambda rec: rec.agent_id), changed
