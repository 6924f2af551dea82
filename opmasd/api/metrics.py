"""The daemon's Prometheus metrics: one registry of its own, rendered for `GET /metrics`.

Three sources, one registry (never prometheus_client's global one, so tests and a second daemon
in one process do not share numbers):
- the manager's numbers, read at scrape time from `AgentManager.stats()` (agents by state,
  restarts, heartbeats, store writes) plus the NATS connection state from a callable (the api
  does not know the bus);
- RPCs, recorded as they end by the interceptor (api.rpc_metrics) the gRPC server runs, which
  sees REST calls too, since the gateway calls through a loopback channel;
- the process's CPU, memory and file descriptors (prometheus_client's ProcessCollector).

Restarts are counted without an agent_id label (a fleet of thousands would make thousands of
series): `opmas_agent_restarts_total{cause}` counts the policy's restarts since the daemon
started; `opmas_agent_restart_count{state}` sums the agents' own restart_count (kept in the
store) by state, for "how much are the agents in backoff crashing".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from opmasd.api.rpc_metrics import RpcMetricsInterceptor
from opmasd.manager import AgentManager, Durations

# RPCs answered from memory take tens of microseconds; operations that start or stop processes,
# up to the stop timeout; streams, as long as they are open.
RPC_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
RPC_LABELS = ("method", "code", "transport")


class DaemonMetrics:
    def __init__(self, manager: AgentManager, bus_connected: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        self._rpc_seconds = Histogram(
            "opmas_rpc_duration_seconds",
            "Time from an RPC's start to its status (a stream's whole life), by method, code and transport.",
            RPC_LABELS,
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self._rpc_total = Counter(
            "opmas_rpc_requests",
            "RPCs finished, by method, status code and transport (grpc, or rest through the gateway).",
            RPC_LABELS,
            registry=self.registry,
        )
        # The labelled children, looked up once per label set: a dict hit per call after that.
        self._rpc_children: dict[tuple[str, str, str], tuple[Histogram, Counter]] = {}
        self.registry.register(ManagerCollector(manager, bus_connected))
        ProcessCollector(registry=self.registry)
        # Give this to the gRPC server (GrpcServer(..., interceptors=[metrics.interceptor])).
        self.interceptor = RpcMetricsInterceptor(self.observe_rpc)

    def observe_rpc(self, method: str, code: str, transport: str, seconds: float) -> None:
        """Record one finished call (the interceptor does; so may the REST server, for requests
        it answers itself before any RPC, if it wants them counted)."""
        key = (method, code, transport)
        children = self._rpc_children.get(key)
        if children is None:
            children = self._rpc_children[key] = (
                self._rpc_seconds.labels(*key),
                self._rpc_total.labels(*key),
            )
        children[0].observe(seconds)
        children[1].inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its Content-Type: Prometheus text 0.0.4, or OpenMetrics when the
        scraper's Accept header asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class ManagerCollector(Collector):
    """The manager's stats and the NATS state, turned into metric families at each scrape."""

    def __init__(self, manager: AgentManager, bus_connected: Callable[[], bool]) -> None:
        self._manager = manager
        self._bus_connected = bus_connected

    def describe(self) -> Iterable[Metric]:
        return []  # collected fresh each scrape; nothing to check against at registration

    def collect(self) -> Iterable[Metric]:
        stats = self._manager.stats()
        agents = GaugeMetricFamily("opmas_agents", "Agents known to this daemon, by state.", labels=["state"])
        restart_count = GaugeMetricFamily(
            "opmas_agent_restart_count",
            "Sum of the agents' restart_count (stored; reset when an operator starts an agent), by state.",
            labels=["state"],
        )
        for state, count in stats.agents_by_state.items():
            agents.add_metric([state.value], count)
            restart_count.add_metric([state.value], stats.restart_count_by_state.get(state, 0))
        yield agents
        yield restart_count
        restarts = CounterMetricFamily(
            "opmas_agent_restarts",
            "Restarts made by the restart policy since the daemon started, by cause (exit or inactive).",
            labels=["cause"],
        )
        restarts.add_metric(["exit"], stats.restarts_after_exit)
        restarts.add_metric(["inactive"], stats.restarts_after_inactive)
        yield restarts
        yield CounterMetricFamily(
            "opmas_heartbeats_received",
            "Heartbeats received from agents (those from unknown agents included).",
            value=stats.heartbeats_received,
        )
        yield CounterMetricFamily(
            "opmas_heartbeats_unknown",
            "Heartbeats received from agents this daemon does not know.",
            value=stats.heartbeats_unknown,
        )
        yield CounterMetricFamily(
            "opmas_heartbeats_late",
            "Times a running agent was marked inactive because its heartbeats stopped.",
            value=stats.heartbeats_late,
        )
        yield GaugeMetricFamily(
            "opmas_nats_connected", "1 while connected to NATS, else 0.", value=int(self._bus_connected())
        )
        pending = GaugeMetricFamily(
            "opmas_store_pending_writes",
            "Writes not yet committed to the store: agent rows and transitions, last-seen times.",
            labels=["kind"],
        )
        pending.add_metric(["rows"], stats.pending_writes)
        pending.add_metric(["heartbeats"], stats.pending_heartbeats)
        yield pending
        yield GaugeMetricFamily(
            "opmas_store_failing",
            "1 while the store's last write failed (writes are kept and retried), else 0.",
            value=int(stats.store_failing),
        )
        yield CounterMetricFamily(
            "opmas_store_write_failures", "Store writes (flushes) that failed.", value=stats.store_failures
        )
        flushes = HistogramMetricFamily(
            "opmas_store_flush_duration_seconds",
            "Time of each write-behind flush to the store (failed ones included), by kind.",
            labels=["kind"],
        )
        for kind, durations in (("rows", stats.row_flushes), ("heartbeats", stats.heartbeat_flushes)):
            flushes.add_metric([kind], _cumulative(durations), durations.total)
        yield flushes


def _cumulative(durations: Durations) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*durations.bounds, float("inf")), durations.counts, strict=True):
        running += count
        buckets.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
    return buckets
