"""The gRPC side of `opmasctl top`: the calls it makes, run in worker threads, never on the UI loop.

`Link` is the channel to opmasd and every call in flight on it, so that quitting cancels them
instead of waiting for them; after the daemon went away it is replaced by a fresh channel (an
old one would wait out grpc's reconnect backoff, up to two minutes). `Feed` runs the two loops
(the event stream, and the periodic metrics and listing) and the operations the keys ask for,
and hands each result to the view through `post` (the app's call_from_thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl.connection import Connection, Endpoint
from opmasctl.credentials import ClientTls, Token

# How often a lost daemon is tried again, and how often the table is sampled and listed.
RETRY_SECONDS = 1.0
METRICS_SECONDS = 2.0
LIST_SECONDS = 5.0
# Per tick, at most this many GetAgentMetrics calls, each bounded by METRICS_DEADLINE.
METRICS_PER_TICK = 40
METRICS_DEADLINE = 2.0
# A periodic listing gives up after this long even when --timeout allows more.
LIST_DEADLINE = 10.0
PAGE_SIZE = 500

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Stub = agents_pb2_grpc.AgentServiceStub


class Closed(Exception):
    """top is quitting: no new call starts, and the worker that tried ends."""


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


def describe(err: grpc.RpcError) -> str:
    """An error as one line: the server's message, after its code unless it is UNAVAILABLE."""
    if not isinstance(err, grpc.Call):
        return str(err)
    details = err.details() or str(err)
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return details
    return f"{err.code().name.lower()}: {details}"


class Link:
    """The channel top talks to opmasd over, and the calls in flight on it (thread-safe)."""

    def __init__(
        self,
        endpoint: Endpoint,
        timeout: float | None,
        token: Token | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self.endpoint = endpoint
        # Presented on every call, on this channel and on each one that replaces it: the token
        # the command's first connection sent (None when it withheld one), never to a unix socket.
        self.token = token
        self.tls = tls  # the CA and client certificate, for every channel (opmasctl.tls)
        # --timeout: the deadline of a call a key asks for (0 on the command line: none).
        self.timeout = timeout
        self._lock = threading.Lock()
        self._connection = Connection(endpoint, token=token, tls=tls)
        self._calls: set[_Cancellable] = set()
        self._closed = False

    def _stub(self) -> Stub:
        with self._lock:
            if self._closed:
                raise Closed
            return self._connection.stub

    def _track(self, call: _Cancellable) -> None:
        with self._lock:
            if self._closed:
                call.cancel()
                raise Closed
            self._calls.add(call)

    def _untrack(self, call: _Cancellable) -> None:
        with self._lock:
            self._calls.discard(call)

    def unary(
        self,
        method: Callable[[Stub], grpc.UnaryUnaryMultiCallable[Req, Resp]],
        request: Req,
        timeout: float | None,
    ) -> Resp:
        """One call, cancellable by close(); raises grpc.RpcError, or Closed once closing."""
        future = method(self._stub()).future(request, timeout=timeout)
        self._track(future)
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise Closed from None
        finally:
            self._untrack(future)

    def stream(
        self, method: Callable[[Stub], grpc.UnaryStreamMultiCallable[Req, Resp]], request: Req
    ) -> Iterator[Resp]:
        """A server stream without deadline, cancelled by close()."""
        call: Any = method(self._stub())(request)
        self._track(call)
        try:
            yield from call
        finally:
            self._untrack(call)

    def reconnect(self) -> None:
        """A fresh channel for the calls to come (those in flight on the old one fail)."""
        fresh = Connection(self.endpoint, token=self.token, tls=self.tls)
        with self._lock:
            if self._closed:
                fresh.close()
                raise Closed
            old, self._connection = self._connection, fresh
        old.close()

    def close(self) -> None:
        """Cancels every call in flight and refuses new ones; the workers then end at once."""
        with self._lock:
            self._closed = True
            calls = list(self._calls)
            connection = self._connection
        for call in calls:
            call.cancel()
        connection.close()


class View(Protocol):
    """What the feed tells the view; each method runs on the UI loop (through `post`)."""

    def connected(self, agents: list[agents_pb2.Agent], requested_at: float) -> None: ...

    def disconnected(self, reason: str) -> None: ...

    def event(self, event: agents_pb2.AgentEvent) -> bool: ...

    def added(self, agent: agents_pb2.Agent) -> None: ...

    def listed(self, agents: list[agents_pb2.Agent], requested_at: float) -> None: ...

    def sampled(self, samples: list[agents_pb2.AgentMetrics]) -> None: ...

    def metric_targets(self) -> list[str]: ...

    def problem(self, text: str) -> None: ...


# Runs a view method on the UI loop and returns its result (App.call_from_thread, made safe for
# the moment the app ends: it raises Closed then).
Post = Callable[..., Any]


class Feed:
    """The loops that keep the view current, and the calls the keys make."""

    def __init__(self, link: Link, view: View, post: Post) -> None:
        self._link = link
        self._view = view
        self._post = post
        self._stopping = threading.Event()
        self._connected = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self._link.close()

    def list_agents(self) -> list[agents_pb2.Agent]:
        """Every agent, page by page (as `agents list` does)."""
        deadline = LIST_DEADLINE if self._link.timeout is None else min(self._link.timeout, LIST_DEADLINE)
        request = agents_pb2.ListAgentsRequest(page_size=PAGE_SIZE)
        agents: list[agents_pb2.Agent] = []
        seen: set[str] = set()
        while True:
            response = self._link.unary(lambda stub: stub.ListAgents, request, deadline)
            agents.extend(response.agents)
            token = response.next_page_token
            if not token or token in seen:  # a repeated token would loop forever
                return agents
            seen.add(token)
            request.page_token = token

    def watch(self) -> None:
        """The event stream, opened again a second after it broke, until top quits."""
        try:
            while not self._stopping.is_set():
                try:
                    self._follow_events()
                    reason = "the event stream ended"
                except grpc.RpcError as err:
                    reason = describe(err)
                if self._stopping.is_set():
                    return
                self._connected.clear()
                self._post(self._view.disconnected, reason)
                if self._stopping.wait(RETRY_SECONDS):
                    return
                self._link.reconnect()
        except Closed:
            return

    def _follow_events(self) -> None:
        # Listed first: the specs, and the agents that exist (the stream tells no deletion).
        requested_at = time.monotonic()
        agents = self.list_agents()
        self._post(self._view.connected, agents, requested_at)
        self._connected.set()
        request = agents_pb2.WatchEventsRequest(initial_states=True)
        for event in self._link.stream(lambda stub: stub.WatchEvents, request):
            if not self._post(self._view.event, event):
                self._add(event.agent_id)

    def _add(self, agent_id: str) -> None:
        """An agent registered while top runs: its spec and status."""
        try:
            agent = self._link.unary(
                lambda stub: stub.GetAgent, agents_pb2.GetAgentRequest(agent_id=agent_id), self._link.timeout
            )
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.NOT_FOUND:
                return  # deleted again already
            raise
        self._post(self._view.added, agent)

    def poll(self) -> None:
        """CPU and memory of the visible live agents every METRICS_SECONDS, the whole list every
        LIST_SECONDS (new agents that did not start, deleted ones, heartbeats)."""
        next_list = time.monotonic() + LIST_SECONDS
        try:
            while not self._stopping.wait(METRICS_SECONDS):
                if not self._connected.is_set():
                    continue  # watch() reports the daemon's absence and lists again when back
                try:
                    self._sample()
                    if time.monotonic() >= next_list:
                        next_list = time.monotonic() + LIST_SECONDS
                        requested_at = time.monotonic()
                        self._post(self._view.listed, self.list_agents(), requested_at)
                except grpc.RpcError as err:
                    if self._connected.is_set():
                        self._post(self._view.problem, f"refresh failed: {describe(err)}")
        except Closed:
            return

    def _sample(self) -> None:
        samples: list[agents_pb2.AgentMetrics] = []
        # A slow daemon costs at most one tick: the agents left over wait for the next one.
        budget = time.monotonic() + METRICS_SECONDS
        for agent_id in self._post(self._view.metric_targets)[:METRICS_PER_TICK]:
            if time.monotonic() > budget:
                break
            request = agents_pb2.GetAgentMetricsRequest(agent_id=agent_id)
            try:
                samples.append(self._link.unary(lambda stub: stub.GetAgentMetrics, request, METRICS_DEADLINE))
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    continue  # stopped or deleted since: the next event or listing shows it
                raise
        self._post(self._view.sampled, samples)

    def operate(self, verb: str, agent_id: str, stop_timeout: float | None) -> str:
        """start, stop or restart; the line to show. Raises grpc.RpcError (shown by the caller)."""
        timeout = self._link.timeout
        if timeout is not None and verb != "start" and stop_timeout:
            timeout += stop_timeout  # the server waits out the agent's stop_timeout
        response: (
            agents_pb2.StartAgentResponse | agents_pb2.StopAgentResponse | agents_pb2.RestartAgentResponse
        )
        if verb == "start":
            response = self._link.unary(
                lambda stub: stub.StartAgent, agents_pb2.StartAgentRequest(agent_id=agent_id), timeout
            )
            done, same = "started", "is already running"
        elif verb == "stop":
            response = self._link.unary(
                lambda stub: stub.StopAgent, agents_pb2.StopAgentRequest(agent_id=agent_id), timeout
            )
            done, same = "stopped", "is already stopped"
        elif verb == "restart":
            response = self._link.unary(
                lambda stub: stub.RestartAgent, agents_pb2.RestartAgentRequest(agent_id=agent_id), timeout
            )
            done, same = "restarted", "was not restarted"
        else:
            raise ValueError(f"unknown operation {verb!r}")
        if response.changed:
            return f"agent {agent_id} {done}"
        return response.message or f"agent {agent_id} {same}"

    def logs(self, agent_id: str, lines: int) -> list[agents_pb2.LogLine]:
        """The last lines of the agent's log (no follow)."""
        request = agents_pb2.GetAgentLogsRequest(agent_id=agent_id, tail_lines=lines)
        return list(self._link.stream(lambda stub: stub.GetAgentLogs, request))
