"""An in-memory AgentStore, for tests of the manager that need no database.

It keeps the SqlStore's contract (the shared contract test holds both to it): records and
transitions are deep-copied on the way in and out, so a caller mutating what it saved or
loaded cannot change what is stored, just as with a real database.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime

from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.core.auth import ApiToken
from opmasd.core.errors import StoreError, StoreRejected
from opmasd.core.model import AgentRecord, Transition


class MemoryStore:
    def __init__(self) -> None:
        self._agents: dict[str, AgentRecord] = {}
        # Per agent, oldest first: append order is the order of events, as in SqlStore.
        self._transitions: dict[str, list[Transition]] = {}
        # API tokens by token_id (frozen values: nothing to copy).
        self.tokens: dict[str, ApiToken] = {}
        # The audit trail, oldest first, each with the id it was given (ids count from 1).
        self.audit: list[AuditRecord] = []
        self._audit_ids = 0
        self._closed = False
        # Set by a test to make every call raise it: a database that went away.
        self.failure: StoreError | None = None
        # Set by a test: rows of these agents are refused (StoreRejected), as a database refuses
        # a value too long; the whole batch they are in fails, as in one transaction.
        self.refuse: set[str] = set()

    def load_agents(self) -> list[AgentRecord]:
        self._check("load agents")
        return [copy.deepcopy(self._agents[agent_id]) for agent_id in sorted(self._agents)]

    def save_agent(self, record: AgentRecord) -> None:
        self._check(f"save agent {record.agent_id}")
        self._agents[record.agent_id] = copy.deepcopy(record)

    def record_transition(self, record: AgentRecord, transition: Transition) -> None:
        if transition.agent_id != record.agent_id:
            raise ValueError(
                f"transition of agent {transition.agent_id!r} recorded with the row of {record.agent_id!r}"
            )
        self._check(f"record transition of {record.agent_id}")
        # Both or neither: nothing between these lines can fail.
        self._agents[record.agent_id] = copy.deepcopy(record)
        self._transitions.setdefault(record.agent_id, []).append(copy.deepcopy(transition))

    def write_batch(self, records: Sequence[AgentRecord], transitions: Sequence[Transition]) -> None:
        self._check(f"write {len(records)} agents and {len(transitions)} transitions")
        refused = sorted({r.agent_id for r in records} & self.refuse)
        if refused:
            raise StoreRejected(f"write failed: the row of {refused[0]} is refused")
        for record in records:
            self._agents[record.agent_id] = copy.deepcopy(record)
        for transition in transitions:
            self._transitions.setdefault(transition.agent_id, []).append(copy.deepcopy(transition))

    def commit_rows(self, records: Sequence[AgentRecord]) -> None:
        self.write_batch(records, ())

    def remove_rows(self, created: Mapping[str, datetime]) -> None:
        self._check(f"remove {len(created)} agents")
        for agent_id, at in created.items():
            if agent_id in self._agents and self._agents[agent_id].created_at == at:
                del self._agents[agent_id]
                self._transitions.pop(agent_id, None)

    def sync(self) -> None:
        self._check("sync")

    def save_heartbeats(self, last_seen: Mapping[str, datetime]) -> None:
        self._check(f"save heartbeats of {len(last_seen)} agents")
        for agent_id, seen in last_seen.items():
            if agent_id in self._agents:
                self._agents[agent_id] = dataclasses.replace(self._agents[agent_id], last_heartbeat=seen)

    def transitions(self, agent_id: str, limit: int = 100) -> list[Transition]:
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        self._check(f"load transitions of {agent_id}")
        newest_first = reversed(self._transitions.get(agent_id, []))
        return [copy.deepcopy(t) for _, t in zip(range(limit), newest_first, strict=False)]

    def prune_transitions(self, keep_per_agent: int) -> int:
        if keep_per_agent < 0:
            raise ValueError(f"keep_per_agent must not be negative, not {keep_per_agent}")
        self._check("prune transitions")
        dropped = 0
        for agent_id, kept in self._transitions.items():
            excess = max(0, len(kept) - keep_per_agent)
            dropped += excess
            self._transitions[agent_id] = kept[excess:]
        return dropped

    def load_tokens(self) -> list[ApiToken]:
        self._check("load API tokens")
        return [self.tokens[token_id] for token_id in sorted(self.tokens)]

    def save_token(self, token: ApiToken) -> None:
        self._check(f"save API token {token.token_id}")
        self.tokens[token.token_id] = token

    def append_audit(self, records: Sequence[AuditRecord]) -> None:
        self._check(f"append {len(records)} audit records")
        for record in records:
            self._audit_ids += 1
            self.audit.append(dataclasses.replace(copy.deepcopy(record), id=self._audit_ids))

    def audit_records(self, query: AuditFilter) -> list[AuditRecord]:
        if query.limit < 0:
            raise ValueError(f"limit must not be negative, not {query.limit}")
        self._check("read audit records")
        found: list[AuditRecord] = []
        for record in reversed(self.audit):
            if len(found) >= query.limit:
                break
            if (
                (not query.target or record.target == query.target)
                and (not query.actor or record.actor == query.actor)
                and (query.since is None or record.time >= query.since)
                and (query.before_id is None or (record.id or 0) < query.before_id)
            ):
                found.append(copy.deepcopy(record))
        return found

    def prune_audit(self, keep: int) -> int:
        if keep < 0:
            raise ValueError(f"keep must not be negative, not {keep}")
        self._check("prune audit records")
        dropped = max(0, len(self.audit) - keep)
        del self.audit[:dropped]
        return dropped

    def close(self) -> None:
        self._closed = True

    def _check(self, what: str) -> None:
        if self._closed:
            raise StoreError(f"cannot {what}: the store is closed")
        if self.failure is not None:
            raise self.failure
