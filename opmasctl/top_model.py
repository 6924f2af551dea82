"""What `opmasctl top` shows, as plain data: the agents' rows, their order and their cells.

No textual and no gRPC calls here: the view (top_app) and the feed (top_feed) hand messages in,
and the functions below decide the order and the text, so that they are unit-tested alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from opmas.v1 import agents_pb2
from opmasctl.output import EMPTY, human_bytes, human_duration, visible_controls
from opmasctl.views import state_text

# A process is there (or being launched or stopped): uptime and CPU/memory mean something.
LIVE_STATES = frozenset(
    {
        agents_pb2.AGENT_STATE_STARTING,
        agents_pb2.AGENT_STATE_RUNNING,
        agents_pb2.AGENT_STATE_STOPPING,
        agents_pb2.AGENT_STATE_INACTIVE,
    }
)

# Rich styles of the state text, the colours of the tables (README "Output"); the state is always
# written out too, so that it reads the same under NO_COLOR (textual then draws in monochrome).
STATE_STYLES = {
    "running": "green",
    "starting": "cyan",
    "stopping": "cyan",
    "stopped": "",
    "error": "bold red",
    "inactive": "yellow",
    "backoff": "yellow",
}


@dataclass(frozen=True)
class Column:
    """A column of the table; `descending` is its first direction when picked (CPU: biggest first)."""

    label: str
    descending: bool


COLUMNS = (
    Column("ID", False),
    Column("STATE", False),
    Column("PID", False),
    Column("UPTIME", True),
    Column("RESTARTS", True),
    Column("CPU%", True),
    Column("MEMORY", True),
    Column("LAST HEARTBEAT", True),
)


@dataclass(frozen=True)
class SortOrder:
    """The column the rows are sorted by (an index of COLUMNS) and the direction."""

    column: int = 0
    descending: bool = False

    def pick(self, column: int) -> SortOrder:
        """Sort by this column, in its own first direction."""
        return SortOrder(column % len(COLUMNS), COLUMNS[column % len(COLUMNS)].descending)

    def next(self) -> SortOrder:
        """The next column to the right (after the last: the first again)."""
        return self.pick(self.column + 1)

    def reversed(self) -> SortOrder:
        return SortOrder(self.column, not self.descending)

    def label(self, column: int) -> str:
        """The column's header, with an arrow on the one sorted by."""
        text = COLUMNS[column].label
        if column != self.column:
            return text
        return f"{text} {'▼' if self.descending else '▲'}"


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    """A Timestamp as seconds since the epoch (what time.time() counts)."""
    return ts.ToNanoseconds() / 1e9


@dataclass
class AgentRow:
    """One agent as top knows it: its last status, and the CPU/memory of its last sample."""

    agent_id: str
    status: agents_pb2.AgentStatus
    # The spec's stop_timeout in seconds (a stop may take that long on the server); None: unset.
    stop_timeout: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    # time.monotonic() of the last news about it from the daemon (see Fleet.reconcile).
    updated: float = 0.0

    @property
    def live(self) -> bool:
        return self.status.state in LIVE_STATES and self.status.pid > 0

    @property
    def state(self) -> str:
        return state_text(self.status.state)

    def uptime(self, now: float) -> float | None:
        """Seconds since the process started, counted here so that it ticks between updates."""
        if not self.live or not self.status.HasField("start_time"):
            return None
        return max(0.0, now - _seconds(self.status.start_time))

    def heartbeat_age(self, now: float) -> float | None:
        if not self.status.HasField("last_heartbeat_time"):
            return None
        return max(0.0, now - _seconds(self.status.last_heartbeat_time))

    def set_status(self, status: agents_pb2.AgentStatus, now: float) -> None:
        if not (status.state in LIVE_STATES and status.pid == self.status.pid):
            # Another process, or none: the last sample is no longer this agent's.
            self.cpu_percent = None
            self.rss_bytes = None
        self.status = status
        self.updated = now


def sort_value(row: AgentRow, column: int, now: float) -> tuple[str, float] | None:
    """What a row is sorted by in a column (its text, or its number); None (nothing to show)
    always sorts last."""
    label = COLUMNS[column].label
    if label == "ID":
        return (row.agent_id, 0.0)
    if label == "STATE":
        return (row.state, 0.0)
    status = row.status
    values: dict[str, float | None] = {
        "PID": float(status.pid) if status.pid else None,
        "UPTIME": row.uptime(now),
        "RESTARTS": float(status.restart_count),
        "CPU%": row.cpu_percent,
        "MEMORY": float(row.rss_bytes) if row.rss_bytes is not None else None,
        # Descending is the most recent first: sort by the time, not the age.
        "LAST HEARTBEAT": (
            _seconds(status.last_heartbeat_time) if status.HasField("last_heartbeat_time") else None
        ),
    }
    value = values[label]
    return None if value is None else ("", value)


def sort_rows(rows: Iterable[AgentRow], order: SortOrder, now: float) -> list[AgentRow]:
    """Rows in the order shown: by the column, ties by id (ascending either way), empty last."""
    present: list[tuple[tuple[str, float], AgentRow]] = []
    missing: list[AgentRow] = []
    for row in sorted(rows, key=lambda row: row.agent_id):
        value = sort_value(row, order.column, now)
        if value is None:
            missing.append(row)
        else:
            present.append((value, row))
    # sort() is stable with reverse=True too: equal values keep the id order.
    present.sort(key=lambda pair: pair[0], reverse=order.descending)
    return [row for _, row in present] + missing


def row_cells(row: AgentRow, now: float) -> tuple[str, ...]:
    """The texts of a row, in COLUMNS order."""
    status = row.status
    uptime = row.uptime(now)
    heartbeat = row.heartbeat_age(now)
    return (
        row.agent_id,
        row.state,
        str(status.pid) if status.pid else EMPTY,
        human_duration(int(uptime)) if uptime is not None else EMPTY,
        str(status.restart_count),
        f"{row.cpu_percent:.1f}" if row.cpu_percent is not None else EMPTY,
        human_bytes(row.rss_bytes) if row.rss_bytes is not None else EMPTY,
        f"{human_duration(int(heartbeat))} ago" if heartbeat is not None else EMPTY,
    )


def log_text(line: agents_pb2.LogLine) -> str:
    """A log line as `agents logs` prints it on a terminal: stderr lines begin with `[err] `,
    control characters are shown as \\xNN (the agent's escape codes must not reach the screen)."""
    text = visible_controls(line.line.removesuffix("\n"))
    return "[err] " + text if line.stream == agents_pb2.LOG_STREAM_STDERR else text


def _stop_timeout(agent: agents_pb2.Agent) -> float | None:
    if not agent.spec.HasField("stop_timeout"):
        return None
    return agent.spec.stop_timeout.ToNanoseconds() / 1e9


class Fleet:
    """The agents top shows, by id. Owned by the UI thread; the feed's results are applied here."""

    def __init__(self) -> None:
        self.rows: dict[str, AgentRow] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self.rows

    def put(self, agent: agents_pb2.Agent, now: float | None = None) -> None:
        """An agent as GetAgent or ListAgents returned it: added, or its row brought up to date."""
        now = time.monotonic() if now is None else now
        row = self.rows.get(agent.agent_id)
        if row is None:
            self.rows[agent.agent_id] = AgentRow(
                agent.agent_id, agent.status, _stop_timeout(agent), updated=now
            )
            return
        row.stop_timeout = _stop_timeout(agent)
        row.set_status(agent.status, now)

    def reconcile(self, agents: Sequence[agents_pb2.Agent], requested_at: float) -> None:
        """A whole listing, asked for at `requested_at` (monotonic): every agent in it is put, and
        a row it lacks is dropped (deleted while the stream was down) unless news of it came
        after the listing was asked for (an agent registered meanwhile)."""
        listed = {agent.agent_id for agent in agents}
        for agent in agents:
            row = self.rows.get(agent.agent_id)
            if row is not None and row.updated > requested_at:
                # A change came in after the listing was asked for: its status is the newer one.
                row.stop_timeout = _stop_timeout(agent)
                continue
            self.put(agent, requested_at)
        for agent_id in [key for key, row in self.rows.items() if key not in listed]:
            if self.rows[agent_id].updated < requested_at:
                del self.rows[agent_id]

    def apply_event(self, event: agents_pb2.AgentEvent, now: float | None = None) -> bool:
        """A state change from WatchEvents; False when the agent is not known here (yet)."""
        row = self.rows.get(event.agent_id)
        if row is None:
            return event.deleted  # nothing to forget: not unknown either
        if event.deleted:
            del self.rows[event.agent_id]
            return True
        row.set_status(event.status, time.monotonic() if now is None else now)
        return True

    def apply_metrics(self, samples: Iterable[agents_pb2.AgentMetrics]) -> None:
        for sample in samples:
            row = self.rows.get(sample.agent_id)
            if row is not None and row.live:
                row.cpu_percent = sample.cpu_percent
                row.rss_bytes = sample.rss_bytes

    def metric_targets(self, shown: Sequence[str], limit: int) -> list[str]:
        """Which agents to sample next: the live ones among `shown` (the visible rows, in order),
        at most `limit`, so that a fleet of thousands costs no more than a screenful."""
        live = [agent_id for agent_id in shown if agent_id in self.rows and self.rows[agent_id].live]
        return live[:limit]

    def counts(self) -> tuple[int, int]:
        """(agents, of which running)."""
        running = sum(1 for row in self.rows.values() if row.status.state == agents_pb2.AGENT_STATE_RUNNING)
        return len(self.rows), running
