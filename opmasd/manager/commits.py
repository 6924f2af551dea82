"""Acknowledged means committed: an operator's change is committed before it is acted on or
answered, and undone in memory when it cannot be.

Operations (manager.operations) make a change in memory, save it, and hand it here. The row
carrying it must be committed within the store's commit timeout; if it is not, `undo` puts
memory back as the store holds it and the caller learns why: INVALID_ARGUMENT for values the
database refuses, UNAVAILABLE when the database is unavailable. What is not acknowledged is
not kept, so the daemon never runs on a change that a restart would forget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from opmasd.core.errors import StoreError, StoreRejected, Unavailable
from opmasd.core.model import AgentRecord, DesiredState
from opmasd.manager.persistence import WriteBehind
from opmasd.manager.registry import AgentRegistry
from opmasd.manager.supervisor import Supervisor

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Commits:
    def __init__(self, registry: AgentRegistry, writes: WriteBehind, supervisor: Supervisor) -> None:
        self._registry = registry
        self._writes = writes
        self._supervisor = supervisor

    async def change(self, rec: AgentRecord, undo: Callable[[], None]) -> None:
        """Wait until the change just saved for rec is committed; `undo` it if it cannot be.
        An exit meanwhile is handled once the outcome is known (Supervisor.committing)."""
        with self._supervisor.committing(rec.agent_id):
            try:
                await self._writes.commit(rec.agent_id)
            except StoreError as exc:
                undo()
                log.error("operator's change not committed; undone", agent_id=rec.agent_id, error=str(exc))
                if isinstance(exc, StoreRejected):
                    raise
                raise self._unavailable(rec, exc) from exc

    async def desired(self, rec: AgentRecord, desired: DesiredState) -> None:
        """Commit the operator's desired state before acting on it."""
        previous = rec.desired
        if previous is desired:
            return
        rec.desired = desired
        self._registry.save(rec)

        def undo() -> None:
            rec.desired = previous
            self._registry.save(rec)

        await self.change(rec, undo)

    async def desired_many(self, recs: list[AgentRecord], desired: DesiredState) -> dict[str, Exception]:
        """desired() for many agents in one commit (a bulk operation). Each agent whose change
        was not committed is undone and named with its error; the others are committed."""
        previous = {rec.agent_id: rec.desired for rec in recs}
        changed = [rec for rec in recs if rec.desired is not desired]
        for rec in changed:
            rec.desired = desired
            self._registry.save(rec)
        errors: dict[str, Exception] = {}
        # Exits meanwhile wait for the outcome, as in change(): undone before they are handled.
        with contextlib.ExitStack() as held:
            for rec in changed:
                held.enter_context(self._supervisor.committing(rec.agent_id))
            failed = await self._writes.commit_many([rec.agent_id for rec in changed])
            for rec in changed:
                exc = failed.get(rec.agent_id)
                if exc is None:
                    continue
                rec.desired = previous[rec.agent_id]
                self._registry.save(rec)
                log.error("operator's change not committed; undone", agent_id=rec.agent_id, error=str(exc))
                errors[rec.agent_id] = exc if isinstance(exc, StoreRejected) else self._unavailable(rec, exc)
        return errors

    @staticmethod
    def _unavailable(rec: AgentRecord, exc: StoreError) -> Unavailable:
        # "undone", not "not made": a write whose reply was lost may have landed, and is then
        # taken back (a registration's row removed, the old row written).
        return Unavailable(f"agent {rec.agent_id}: the change is undone, the database is unavailable: {exc}")

    async def observed(self, agent_id: str) -> None:
        """Wait for the attempt that writes what an operation observed (PID, state). Its
        failure is not the operator's: the change asked for is committed, and observations
        are retried until written (and found again by re-adoption after a crash)."""
        refused = (await self.observed_many([agent_id])).get(agent_id)
        if refused is not None:
            raise refused

    async def observed_after(self, agent_id: str, operation: Awaitable[T]) -> T:
        """The operation's result, or its error, once what it observed is committed: a start
        window's outcome (running, or the error it failed with) is answered only once written."""
        try:
            return await operation
        finally:
            await self.observed(agent_id)

    async def observed_many(self, agent_ids: list[str]) -> dict[str, StoreRejected]:
        """observed() for the agents of a bulk operation, in one wait: those whose row the
        database refused (their operation's outcome), the others logged and retried."""
        refused: dict[str, StoreRejected] = {}
        for agent_id, exc in (await self._writes.flushed_many(agent_ids)).items():
            if isinstance(exc, StoreRejected):
                refused[agent_id] = exc
            else:
                log.warning(
                    "agent's observed state not yet written; will retry", agent_id=agent_id, error=str(exc)
                )
        return refused
