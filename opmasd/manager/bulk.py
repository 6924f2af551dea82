"""Bulk operations: which agents a request selects, and one operation run on all of them at once.

A bulk start, stop or restart gives each agent what StartAgent/StopAgent/RestartAgent would
(its lock, its desired state committed before anything is done, its events), but commits all
the desired states in one write and waits for what they observed once: stopping 500 agents is
one commit, then 500 stops under way together, not 500 requests. One slow agent costs the
others nothing. The outcome is reported per agent: an agent that failed is a result, not a
failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from opmasd.core.errors import FieldViolation, InvalidArgument, OpmasError
from opmasd.core.ids import check_agent_id
from opmasd.core.labels import SelectorError, parse_selector
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


def selected_ids(selection: Selection, local: Iterable[AgentRecord]) -> list[str]:
    """The agent ids the selection names, in id order. Named ids are taken as given (an unknown
    one fails on its own); a selector or `all` picks among `local`, this node's live agents."""
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
        return sorted(set(selection.agent_ids))
    if selection.all:
        return sorted(rec.agent_id for rec in local)
    try:
        selector = parse_selector(selection.label_selector)
    except SelectorError as exc:
        raise InvalidArgument.single("label_selector", str(exc)) from None
    return sorted(rec.agent_id for rec in local if selector.matches(rec.spec.label_map))


class BulkRunner:
    """Runs one operation on many agents: their locks taken in id order (two bulk operations
    cannot deadlock), one commit of every desired state, each agent's operation at once, one
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
    ) -> list[BulkOutcome]:
        agent_ids = selected_ids(selection, self._local_agents())
        outcomes: dict[str, BulkOutcome] = {}
        async with contextlib.AsyncExitStack() as locks:
            for agent_id in agent_ids:
                await locks.enter_async_context(self._supervisor.lock(agent_id))
            recs: list[AgentRecord] = []
            for agent_id in agent_ids:
                try:
                    recs.append(self._local_agent(agent_id))
                except OpmasError as exc:
                    outcomes[agent_id] = BulkOutcome(agent_id, error=exc)
            failed = await self._commits.desired_many(recs, desired)
            outcomes.update((agent_id, BulkOutcome(agent_id, error=exc)) for agent_id, exc in failed.items())
            acting = [rec for rec in recs if rec.agent_id not in failed]
            for outcome in await asyncio.gather(*(_outcome(rec.agent_id, act(rec)) for rec in acting)):
                outcomes[outcome.agent_id] = outcome
        await self._commits.observed()
        settling = [o for o in outcomes.values() if o.result is not None and o.result.pending is not None]
        for outcome in await asyncio.gather(*(self._settled(o) for o in settling)):
            outcomes[outcome.agent_id] = outcome
        return [outcomes[agent_id] for agent_id in agent_ids]

    async def _settled(self, outcome: BulkOutcome) -> BulkOutcome:
        assert outcome.result is not None
        return await _outcome(outcome.agent_id, self._supervisor.settled(outcome.result))


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
