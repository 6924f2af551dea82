"""The interface between the manager and its store.

Calls are synchronous and short: the manager serves reads from memory and writes through
here on every change, so that a daemon started after a crash or a reboot finds what the
operator wanted and what was last observed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.core.auth import ApiToken
from opmasd.core.model import AgentRecord, Transition


class AgentStore(Protocol):
    def load_agents(self) -> list[AgentRecord]:
        """Every agent row, deleted ones (tombstones, deleted=True) included."""

    def write_batch(self, records: Sequence[AgentRecord], transitions: Sequence[Transition]) -> None:
        """In one transaction: save every record's row, then append the transitions in order.

        The manager queues its writes and hands them over a batch at a time, so a burst (200
        agents stopped at once) costs one transaction, not 400.
        """

    def commit_rows(self, records: Sequence[AgentRecord]) -> None:
        """In one transaction: save operators' changes (full rows), where they must be before
        they are acknowledged (with a node copy: the shared database first). StoreError when
        they cannot be; then nothing was written."""

    def remove_rows(self, created: Mapping[str, datetime]) -> None:
        """Delete the rows of registrations undone: each agent's row only if it was created at
        the given time (a write whose outcome was unknown may have landed), with its
        transitions."""

    def sync(self) -> None:
        """Write what only this node's copy holds to the shared database (nothing to do for a
        single database). StoreDegraded while the shared database is unreachable."""

    def save_heartbeats(self, last_seen: Mapping[str, datetime]) -> None:
        """In one transaction: set each agent's last heartbeat time (agents absent are skipped).

        Heartbeats arrive far more often than anything else; they are batched by the manager
        and written with this, so the store sees a flush or two a second, not every message.
        """

    def transitions(self, agent_id: str, limit: int = 100) -> list[Transition]:
        """The agent's latest transitions, newest first."""

    def prune_transitions(self, keep_per_agent: int) -> int:
        """Drop all but the newest `keep_per_agent` transitions of each agent; returns how many went."""

    def load_tokens(self) -> list[ApiToken]:
        """Every API token, revoked and expired ones included. Tokens are fleet-wide: with a
        shared database they are read there, and StoreError while it is unreachable."""

    def save_token(self, token: ApiToken) -> None:
        """In one transaction: insert the token's row, or replace the row of its token_id.
        StoreError when it cannot be written (with a shared database: there); StoreRejected
        for values the database refuses."""

    def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """In one transaction: append the audit records, in order (each gets the next id; the
        records' own ids are ignored). Text longer than its column is cut, parameters are kept
        as JSON of at most MAX_PARAMETERS_BYTES. The audit trail is fleet-wide: with a shared
        database it is written there alone, and StoreError while it is unreachable."""

    def audit_records(self, query: AuditFilter) -> list[AuditRecord]:
        """The records that match every field set in the query, newest (highest id) first, at
        most query.limit of them (the caller bounds it). Read where append_audit writes."""

    def prune_audit(self, keep: int) -> int:
        """Delete all but the newest `keep` audit records; returns how many were deleted."""

    def close(self) -> None: ...
