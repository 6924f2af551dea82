"""Bulk operations: which agents a request selects, and one operation run on all of them at once.

A bulk start, stop or restart gives each agent what StartAgent/StopAgent/RestartAgent would
(its lock, its desired state committed before anything is done, its events), but commits all
the desired states in one write and waits for what they observed once: stopping 500 agents is
one commit, then 500 stops under way together, not 500 requests. One slow agent costs the
others nothing but their common commit. The outcome is reported per agent: an agent that
failed is a result, not a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from opmasd.core.errors import FieldViolation, InvalidArgument, OpmasError
from opmasd.core.ids import check_agent_id
from opmasd.core.labels import selector_field
from opmasd.core.model import AgentRecord, DesiredState
from opmasd.manager.commits import Commits
from opmasd.manager.supervisor import Supervisor
from opmasd.manager.values import OperationResult

log = structlog.get_logger(__name__)

MAX_SELECTED_IDS = 10_000


@dataclass(frozen=True)
class Selection:
    """Which agents: the ones named, the ones whose labels match, or all (exactly one way)."""

    agent_ids: tuple[str, ...] = ()
    label_selector: str = ""
    all: bool = False


@dataclass(frozen=True)
class BulkOutcome:
    """What one agent's operation gave: its result, or the error it failed with."""

    agent_id: str
    result: OperationResult | None = None
    error: Exception | None = None


def selected_ids(
    selection: Selection, local: Iterable[AgentRecord]
) -> tuple[list[str], Callable[[AgentRecord], bool] | None]:
    """The agent ids the selection names, in id order, and for a selector or `all` the test an
    agent must still pass once its lock is held (None for named ids, which are taken as given:
    an unknown one fails on its own). A selector or `all` picks among `local`, this node's."""
    ways = [
        name
        for name, given in (
            ("agent_ids", bool(selection.agent_ids)),
            ("label_selector", bool(selection.label_selector.strip())),
            ("all", selection.all),
        )
        if given
    ]
    if not ways:
        raise InvalidArgument.single("agent_ids", "selects no agent: give agent_ids, a label_selector or all")
    if len(ways) > 1:
        raise InvalidArgument.single(
            ways[1], f"give only one of agent_ids, label_selector and all, not {' and '.join(ways)}"
        )
    if selection.agent_ids:
        if len(selection.agent_ids) > MAX_SELECTED_IDS:
            raise InvalidArgument.single(
                "agent_ids", f"names {len(selection.agent_ids)} agents; at most {MAX_SELECTED_IDS}"
            )
        violations: list[FieldViolation] = []
        for agent_id in selection.agent_ids:
            try:
                check_agent_id(agent_id, "agent_ids")
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(violations)
        return sorted(set(selection.agent_ids)), None
    if selection.all:
        return sorted(rec.agent_id for rec in local), lambda rec: True
    selector = selector_field(selection.label_selector)

    def matches(rec: AgentRecord) -> bool:
        return selector.matches(rec.spec.label_map)

    return sorted(rec.agent_id for rec in local if matches(rec)), matches


class BulkRunner:
    """Runs one operation on many agents: their locks taken in id order (two bulk operations
    cannot deadlock), one commit of every desired state, a sweep of what must come first (a
    stop's SIGTERMs), each agent's operation at once (each
    lock let go when that agent's operation ends, so a slow agent holds up only itself), one
    wait for what they observed, then the start windows, outside the locks."""

    def __init__(
        self,
        supervisor: Supervisor,
        commits: Commits,
        local_agent: Callable[[str], AgentRecord],
        local_agents: Callable[[], Iterable[AgentRecord]],
    ) -> None:
        self._supervisor = supervisor
        self._commits = commits
        self._local_agent = local_agent
        self._local_agents = local_agents

    async def run(
        self,
        selection: Selection,
        desired: DesiredState,
        act: Callable[[AgentRecord], Awaitable[OperationResult]],
        first: Callable[[AgentRecord], None] | None = None,
    ) -> list[BulkOutcome]:
        """`act` on every selected agent, once its desired state is committed; `first` (if
        given) on all of them in one sweep before any act begins (a stop's SIGTERMs)."""
        agent_ids, still_selected = selected_ids(selection, self._local_agents())
        outcomes: dict[str, BulkOutcome] = {}
        locks = _Locks(self._supervisor)
        try:
            await locks.take(agent_ids)
            recs: list[AgentRecord] = []
            for agent_id in agent_ids:
                try:
                    rec = self._local_agent(agent_id)
                except OpmasError as exc:
                    if still_selected is None:  # named: its error is its outcome
                        outcomes[agent_id] = BulkOutcome(agent_id, error=exc)
                    continue  # else deleted since it was selected: no longer selected
                if still_selected is None or still_selected(rec):  # relabelled meanwhile?
                    recs.append(rec)
            failed = await self._commits.desired_many(recs, desired)
            outcomes.update((agent_id, BulkOutcome(agent_id, error=exc)) for agent_id, exc in failed.items())
            acting = [rec for rec in recs if rec.agent_id not in failed]
            await locks.release_all_but({rec.agent_id for rec in acting})
            if first is not None:
                for rec in acting:
                    first(rec)

            async def one(rec: AgentRecord) -> BulkOutcome:
                try:
                    return await _outcome(rec.agent_id, act(rec))
                finally:
                    await locks.release(rec.agent_id)

            for outcome in await asyncio.gather(*(one(rec) for rec in acting)):
                outcomes[outcome.agent_id] = outcome
        finally:
            await locks.release_all_but(set())
        done = [agent_id for agent_id, outcome in outcomes.items() if outcome.result is not None]
        for agent_id, refused in (await self._commits.observed_many(done)).items():
            outcomes[agent_id] = BulkOutcome(agent_id, error=refused)
        settling = [o for o in outcomes.values() if o.result is not None and o.result.pending is not None]
        for outcome in await asyncio.gather(*(self._settled(o) for o in settling)):
            outcomes[outcome.agent_id] = outcome
        return [outcomes[agent_id] for agent_id in agent_ids if agent_id in outcomes]

    async def _settled(self, outcome: BulkOutcome) -> BulkOutcome:
        assert outcome.result is not None
        settled = self._supervisor.settled(outcome.result)
        return await _outcome(outcome.agent_id, self._commits.observed_after(outcome.agent_id, settled))


async def _outcome(agent_id: str, operation: Awaitable[OperationResult]) -> BulkOutcome:
    """The operation's result, or the error it failed with (logged with its traceback when it
    is not a domain error: a bug, which must not cost the other agents their outcome)."""
    try:
        return BulkOutcome(agent_id, result=await operation)
    except OpmasError as exc:
        return BulkOutcome(agent_id, error=exc)
    except Exception as exc:
        log.exception("bulk operation failed unexpectedly for one agent", agent_id=agent_id)
        return BulkOutcome(agent_id, error=exc)


class _Locks:
    """The agents' locks a bulk operation holds, each let go on its own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._held: dict[str, contextlib.AbstractAsyncContextManager[None]] = {}

    async def take(self, agent_ids: list[str]) -> None:
        for agent_id in agent_ids:  # in id order: see BulkRunner
            lock = self._supervisor.lock(agent_id)
            await lock.__aenter__()
            self._held[agent_id] = lock

    async def release(self, agent_id: str) -> None:
        lock = self._held.pop(agent_id, None)
        if lock is not None:
            await lock.__aexit__(None, None, None)

    async def release_all_but(self, kept: set[str]) -> None:
        for agent_id in [held for held in self._held if held not in kept]:
            await self.release(agent_id)
