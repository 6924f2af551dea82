"""One attempt of the write-behind (manager.persistence) as store calls, on the store's thread.

Operators' rows go first, through `commit_rows` (with a node copy: the shared database first,
since they are acknowledged only once there), then everything observed through `write_batch`,
each in one transaction. When the database refuses a call for its values (StoreRejected: a
constraint, a value too long), it is made again agent by agent, so that only the refused
agents fail and nothing behind them is held up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from opmasd.core.errors import StoreError, StoreRejected
from opmasd.core.model import AgentRecord, Transition
from opmasd.store.base import AgentStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How one agent's part of an attempt went: its operator's row, and the rest (None: written)."""

    committed: StoreError | None
    observed: StoreError | None


@dataclass
class Entry:
    """One agent's writes not yet committed."""

    # The newest row; None after a failed commit dropped it (its caller saves the row it wants).
    snapshot: AgentRecord | None
    transitions: list[Transition] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # An operator's change waits on this row: if the attempt fails, the row is not retried.
    commit: bool = False

    def absorb(self, newer: Entry) -> None:
        """Take a later entry of the same agent in: its row wins, transitions follow in order."""
        if newer.snapshot is not None:
            self.snapshot = newer.snapshot
            self.commit = newer.commit
        self.transitions.extend(newer.transitions)
        self.waiters.extend(newer.waiters)


def write_entries(store: AgentStore, batch: dict[str, Entry]) -> dict[str, Outcome]:
    """On the store's thread: operators' rows (commit_rows), then everything observed
    (write_batch), each in one transaction, or agent by agent if the database refuses it."""
    commits = {a: e for a, e in batch.items() if e.commit and e.snapshot is not None}
    committed = _apply(
        lambda rows, _: store.commit_rows(rows),
        commits,
        lambda e: ([e.snapshot] if e.snapshot is not None else [], []),
    )
    observed = _apply(
        store.write_batch,
        batch,
        lambda e: ([e.snapshot] if e.snapshot is not None and not e.commit else [], e.transitions),
    )
    return {a: Outcome(committed.get(a), observed[a]) for a in batch}


def _apply(
    write: Callable[[list[AgentRecord], list[Transition]], None],
    entries: dict[str, Entry],
    part: Callable[[Entry], tuple[list[AgentRecord], list[Transition]]],
) -> dict[str, StoreError | None]:
    """One store call for the entries' parts; agent by agent when the database refuses it,
    so that only refused agents fail. Each agent's error (None: written)."""

    def call(chosen: Iterable[Entry]) -> None:
        rows: list[AgentRecord] = []
        transitions: list[Transition] = []
        for entry in chosen:
            entry_rows, entry_transitions = part(entry)
            rows += entry_rows
            transitions += entry_transitions
        if rows or transitions:
            write(rows, transitions)

    try:
        call(entries.values())
    except StoreRejected:
        pass
    except StoreError as exc:
        return dict.fromkeys(entries, exc)
    except Exception as exc:  # a bug below us: the store's error all the same, with its trace
        log.exception("store write raised an unexpected error", error=repr(exc))
        return dict.fromkeys(entries, StoreError(f"write failed: {exc!r}"))
    else:
        return dict.fromkeys(entries, None)
    outcome: dict[str, StoreError | None] = {}
    failed: StoreError | None = None
    for agent_id, entry in entries.items():
        if failed is not None:  # the database went away meanwhile: the rest waits
            outcome[agent_id] = failed
            continue
        try:
            call([entry])
            outcome[agent_id] = None
        except StoreRejected as exc:
            outcome[agent_id] = exc
        except StoreError as exc:
            outcome[agent_id] = failed = exc
    return outcome


def settle_waiter(waiter: asyncio.Future[None], error: StoreError | None) -> None:
    """Tell a waiter its attempt's outcome (once: a waiter may be settled already)."""
    if waiter.done():
        return
    if error is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(error)


def retrieve(waiter: asyncio.Future[None]) -> None:
    """A done-callback: a waiter whose caller left is settled later, its error read by nobody."""
    if not waiter.cancelled():
        waiter.exception()
