"""AgentService over grpc.aio: each RPC converts its request, calls the manager, converts back.

No logic lives here beyond that. Domain errors become statuses with details (api/errors.py);
anything unexpected is logged with its traceback and answered INTERNAL, never a dropped call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import agents_pb2_grpc
from opmasd.api import convert, paging
from opmasd.api.auth import sees_secrets
from opmasd.api.errors import code_of, is_known, to_grpc_status
from opmasd.api.grpc_handlers import Undecodable
from opmasd.api.tail_budget import TailBudget
from opmasd.api.wire_cache import AgentWireCache, hide_environment
from opmasd.core.errors import InvalidArgument, Unavailable
from opmasd.core.ids import check_agent_id
from opmasd.manager import AgentFilter, AgentManager, BulkOutcome, OperationResult, Selection

log = structlog.get_logger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 1000
# Below gRPC's default 4 MiB receive limit, with room for the rest of the message.
MAX_PAGE_BYTES = 3 * 1024 * 1024


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    if not is_known(exc):
        log.exception("unexpected error in rpc", method=method)
    await context.abort_with_status(to_grpc_status(exc))


def _refuse_undecodable(request: object) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgument.single("request", f"is not a valid message of its type: {request.reason}")


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            _refuse_undecodable(request)
            return await fn(self, request, context)
        except Exception as exc:  # CancelledError is not one: a cancelled call stays cancelled
            await _abort(context, fn.__name__, exc)
            raise  # abort_with_status raises; this is never reached

    return wrapper


def streaming(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        try:
            _refuse_undecodable(request)
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await _abort(context, fn.__name__, exc)

    return wrapper


async def _until(stop: asyncio.Event, source: AsyncIterator[Resp]) -> AsyncIterator[Resp]:
    """Items of source until it ends or the daemon begins shutting down, which ends the stream
    at once (instead of holding server.stop() for its whole grace period) with UNAVAILABLE, so
    that a client following it learns the daemon went away rather than seeing a clean end."""
    stop_wait = asyncio.ensure_future(stop.wait())
    iterator = source.__aiter__()
    next_item: asyncio.Future[Resp] | None = None
    try:
        while True:
            next_item = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({next_item, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if next_item not in done:
                next_item.cancel()
                await asyncio.gather(next_item, return_exceptions=True)
                raise Unavailable("opmasd is shutting down")
            try:
                yield next_item.result()
            except StopAsyncIteration:
                return
    finally:
        stop_wait.cancel()
        # The client went away (the handler is cancelled) while an item was awaited: that
        # __anext__ must be over before aclose, or aclose fails with "already running".
        if next_item is not None and not next_item.done():
            next_item.cancel()
            await asyncio.gather(next_item, return_exceptions=True)
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _selection(request: pb.StartAgentsRequest | pb.StopAgentsRequest | pb.RestartAgentsRequest) -> Selection:
    return Selection(
        agent_ids=tuple(request.agent_ids), label_selector=request.label_selector, all=request.all
    )


def _operation(result: OperationResult, response_type: Any) -> Any:
    return response_type(
        status=convert.status_to_pb(result.record), changed=result.changed, message=result.message
    )


class AgentService(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, manager: AgentManager, stopping: asyncio.Event) -> None:
        self._manager = manager
        self._stopping = stopping
        self._wire_cache = AgentWireCache()
        self._tails = TailBudget()

    @unary
    async def ListAgents(self, request: pb.ListAgentsRequest, context: Any) -> pb.ListAgentsResponse:
        if request.page_size < 0:
            raise InvalidArgument.single("page_size", f"must not be negative, got {request.page_size}")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        records = self._manager.list_agents(
            AgentFilter(
                state=convert.state_from_pb(request.state),
                type=request.type,
                node=request.node,
                labels=convert.label_selector(request.label_selector),
            )
        )
        total = len(records)
        if request.page_token:
            after = paging.decode_page_token(request.page_token)
            records = [rec for rec in records if rec.agent_id > after]
        if len(self._wire_cache) > 2 * total + 100:
            self._wire_cache.forget_missing({rec.agent_id for rec in self._manager.list_agents()})
        # A page also ends before it outgrows what an ordinary client takes (4 MiB by default).
        response, taken = self._wire_cache.list_page(records[:page_size], MAX_PAGE_BYTES, not sees_secrets())
        if len(records) > taken:
            response.next_page_token = paging.encode_page_token(records[taken - 1].agent_id)
        response.total_size = total
        return response

    @unary
    async def CreateAgent(self, request: pb.CreateAgentRequest, context: Any) -> pb.Agent:
        if request.manifest_path:
            rec = await self._manager.create_agent_from_manifest(
                request.manifest_path, request.agent_id, request.start
            )
        else:
            if not request.HasField("spec"):
                raise InvalidArgument.single("spec", "give a spec or a manifest_path")
            rec = await self._manager.create_agent(
                convert.spec_fields(request.spec), request.agent_id, request.start
            )
        return convert.agent_to_pb(rec)

    @unary
    async def GetAgent(self, request: pb.GetAgentRequest, context: Any) -> pb.Agent:
        agent = convert.agent_to_pb(self._manager.get_agent(request.agent_id))
        return agent if sees_secrets() else hide_environment(agent)

    @unary
    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context: Any) -> pb.Agent:
        check_agent_id(request.agent_id)
        mask = list(request.update_mask.paths) if request.update_mask.paths else None
        rec = await self._manager.update_agent(request.agent_id, convert.spec_fields(request.spec, mask))
        return convert.agent_to_pb(rec)

    @unary
    async def DeleteAgent(self, request: pb.DeleteAgentRequest, context: Any) -> pb.DeleteAgentResponse:
        result = await self._manager.delete_agent(request.agent_id)
        return pb.DeleteAgentResponse(
            agent_id=result.record.agent_id, deleted=result.changed, message=result.message
        )

    @unary
    async def StartAgent(self, request: pb.StartAgentRequest, context: Any) -> pb.StartAgentResponse:
        result = await self._manager.start_agent(request.agent_id)
        return _operation(result, pb.StartAgentResponse)  # type: ignore[no-any-return]

    @unary
    async def StopAgent(self, request: pb.StopAgentRequest, context: Any) -> pb.StopAgentResponse:
        timeout = convert.seconds(request.timeout) if request.HasField("timeout") else None
        result = await self._manager.stop_agent(request.agent_id, timeout)
        return _operation(result, pb.StopAgentResponse)  # type: ignore[no-any-return]

    @unary
    async def RestartAgent(self, request: pb.RestartAgentRequest, context: Any) -> pb.RestartAgentResponse:
        result = await self._manager.restart_agent(request.agent_id)
        return _operation(result, pb.RestartAgentResponse)  # type: ignore[no-any-return]

    @unary
    async def StartAgents(self, request: pb.StartAgentsRequest, context: Any) -> pb.StartAgentsResponse:
        outcomes = await self._manager.start_agents(_selection(request))
        return pb.StartAgentsResponse(results=self._results(outcomes))

    @unary
    async def StopAgents(self, request: pb.StopAgentsRequest, context: Any) -> pb.StopAgentsResponse:
        timeout = convert.seconds(request.timeout) if request.HasField("timeout") else None
        outcomes = await self._manager.stop_agents(_selection(request), timeout)
        return pb.StopAgentsResponse(results=self._results(outcomes))

    @unary
    async def RestartAgents(self, request: pb.RestartAgentsRequest, context: Any) -> pb.RestartAgentsResponse:
        outcomes = await self._manager.restart_agents(_selection(request))
        return pb.RestartAgentsResponse(results=self._results(outcomes))

    def _results(self, outcomes: list[BulkOutcome]) -> list[pb.AgentOperationResult]:
        results = []
        for outcome in outcomes:
            result = pb.AgentOperationResult(agent_id=outcome.agent_id)
            if outcome.result is not None:
                result.changed = outcome.result.changed
                result.message = outcome.result.message
                result.status.CopyFrom(convert.status_to_pb(outcome.result.record))
            else:
                error = outcome.error or RuntimeError("no outcome")
                result.code = code_of(error)
                result.message = str(error) if is_known(error) else "internal error (see opmasd's log)"
                rec = self._manager.find_agent(outcome.agent_id)
                if rec is not None:
                    result.status.CopyFrom(convert.status_to_pb(rec))
            results.append(result)
        return results

    @unary
    async def GetAgentStatus(self, request: pb.GetAgentStatusRequest, context: Any) -> pb.AgentStatus:
        return convert.status_to_pb(self._manager.get_agent(request.agent_id))

    @unary
    async def GetAgentMetrics(self, request: pb.GetAgentMetricsRequest, context: Any) -> pb.AgentMetrics:
        usage = self._manager.usage(request.agent_id)
        reported = self._manager.reported_metrics(request.agent_id)
        return convert.metrics_to_pb(self._manager.get_agent(request.agent_id), usage, reported)

    @streaming
    async def GetAgentLogs(self, request: pb.GetAgentLogsRequest, context: Any) -> AsyncIterator[pb.LogLine]:
        agent_id = request.agent_id
        follow = self._manager.follow_logs(agent_id) if request.follow else None
        lines = request.tail_lines if request.HasField("tail_lines") else None
        since = convert.when(request.since) if request.HasField("since") else None
        # Held until sent, within the budget shared by every tail being sent (api.tail_budget).
        async with self._tails.tail(lambda: self._manager.tail_logs(agent_id, lines, since)) as entries:
            for entry in entries:
                yield convert.log_line_to_pb(agent_id, entry)
        if follow is not None:
            async for entry in _until(self._stopping, follow):
                yield convert.log_line_to_pb(agent_id, entry)

    @streaming
    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> AsyncIterator[pb.AgentEvent]:
        subscription = self._manager.watch(list(request.agent_ids))
        if request.initial_states:
            # In the same step as the subscription: no change can fall between the two.
            wanted = set(request.agent_ids)
            now = [rec for rec in self._manager.list_agents() if not wanted or rec.agent_id in wanted]
            for rec in now:
                yield convert.current_event_to_pb(rec)
        async for event in _until(self._stopping, subscription.__aiter__()):
            yield convert.event_to_pb(event)

    @unary
    async def DiscoverAgents(
        self, request: pb.DiscoverAgentsRequest, context: Any
    ) -> pb.DiscoverAgentsResponse:
        report = await self._manager.discover()
        return pb.DiscoverAgentsResponse(
            agents=[
                pb.DiscoveredAgent(agent_id=a.agent_id, name=a.name, manifest_path=a.manifest_path, new=a.new)
                for a in report.agents
            ],
            errors=[pb.ManifestError(manifest_path=str(e.path), message=e.message) for e in report.errors],
        )

    @unary
    async def SendCommand(self, request: pb.SendCommandRequest, context: Any) -> pb.SendCommandResponse:
        timeout = convert.seconds(request.timeout) if request.HasField("timeout") else None
        params = convert.struct_to_dict(request.params)
        reply = await self._manager.send_command(request.agent_id, request.command, params, timeout)
        return pb.SendCommandResponse(
            agent_id=request.agent_id,
            command=request.command,
            status=reply.status,
            result=convert.to_value(reply.result),
            error=reply.error,
        )
