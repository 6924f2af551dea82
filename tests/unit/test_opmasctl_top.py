"""`opmasctl top`'s pure parts: the order of the rows, their cells, and how the fleet takes the
daemon's news (listings, events, samples). The screen itself: tests/e2e/test_opmasctl_top.py."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from opmas.v1 import agents_pb2 as pb
from opmasctl.cli import build_parser
from opmasctl.top_model import (
    COLUMNS,
    AgentRow,
    Fleet,
    SortOrder,
    log_text,
    row_cells,
    sort_rows,
)

NOW = 1_800_000_000.0
RUNNING = pb.AGENT_STATE_RUNNING
STOPPED = pb.AGENT_STATE_STOPPED


def column(label: str) -> int:
    return [c.label for c in COLUMNS].index(label)


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def status(
    agent_id: str,
    state: pb.AgentState.ValueType = RUNNING,
    pid: int = 0,
    started: float | None = None,
    restarts: int = 0,
    heartbeat: float | None = None,
) -> pb.AgentStatus:
    msg = pb.AgentStatus(agent_id=agent_id, state=state, pid=pid, restart_count=restarts)
    if started is not None:
        msg.start_time.CopyFrom(ts(started))
    if heartbeat is not None:
        msg.last_heartbeat_time.CopyFrom(ts(heartbeat))
    return msg


def row(agent_id: str, cpu: float | None = None, rss: int | None = None, **fields: object) -> AgentRow:
    return AgentRow(agent_id, status(agent_id, **fields), cpu_percent=cpu, rss_bytes=rss)  # type: ignore[arg-type]


def agent(agent_id: str, stop_timeout: float | None = None, **fields: object) -> pb.Agent:
    msg = pb.Agent(agent_id=agent_id, status=status(agent_id, **fields))  # type: ignore[arg-type]
    if stop_timeout is not None:
        msg.spec.stop_timeout.CopyFrom(duration_pb2.Duration(seconds=int(stop_timeout)))
    return msg


def ids(rows: list[AgentRow]) -> list[str]:
    return [r.agent_id for r in rows]


# --- order -------------------------------------------------------------------------------------


def test_rows_come_by_id_first() -> None:
    rows = [row("charlie"), row("alpha"), row("bravo")]
    assert ids(sort_rows(rows, SortOrder(), NOW)) == ["alpha", "bravo", "charlie"]
    assert ids(sort_rows(rows, SortOrder().reversed(), NOW)) == ["charlie", "bravo", "alpha"]


def test_numbers_sort_as_numbers_biggest_first_and_empty_cells_last_either_way() -> None:
    rows = [
        row("a", cpu=9.5, pid=10),
        row("b", cpu=10.0, pid=11),
        row("c", state=STOPPED),  # no sample: nothing to compare
        row("d", cpu=9.5, pid=12),
    ]
    cpu = SortOrder().pick(column("CPU%"))
    assert cpu.descending  # picked: the biggest first, as top does
    assert ids(sort_rows(rows, cpu, NOW)) == ["b", "a", "d", "c"]  # ties by id
    assert ids(sort_rows(rows, cpu.reversed(), NOW)) == ["a", "d", "b", "c"]


def test_uptime_memory_restarts_and_heartbeat_orders() -> None:
    rows = [
        row("old", pid=1, started=NOW - 3600, rss=100, restarts=0, heartbeat=NOW - 50),
        row("new", pid=2, started=NOW - 5, rss=5000, restarts=3, heartbeat=NOW - 1),
        row("off", state=STOPPED, restarts=1),
    ]
    assert ids(sort_rows(rows, SortOrder().pick(column("UPTIME")), NOW)) == ["old", "new", "off"]
    assert ids(sort_rows(rows, SortOrder().pick(column("MEMORY")), NOW)) == ["new", "old", "off"]
    assert ids(sort_rows(rows, SortOrder().pick(column("RESTARTS")), NOW)) == ["new", "off", "old"]
    # The most recent heartbeat first.
    assert ids(sort_rows(rows, SortOrder().pick(column("LAST HEARTBEAT")), NOW)) == ["new", "old", "off"]
    assert ids(sort_rows(rows, SortOrder().pick(column("STATE")), NOW)) == ["new", "old", "off"]


def test_the_sort_key_cycles_through_the_columns_and_marks_the_header() -> None:
    order = SortOrder()
    assert order.label(0) == "ID ▲" and order.label(1) == "STATE"
    seen = []
    for _ in COLUMNS:
        order = order.next()
        seen.append(COLUMNS[order.column].label)
    assert seen == [c.label for c in COLUMNS[1:]] + ["ID"]
    assert SortOrder().pick(column("CPU%")).label(column("CPU%")) == "CPU% ▼"
    assert SortOrder().pick(len(COLUMNS)) == SortOrder()  # a number past the last wraps


# --- cells -------------------------------------------------------------------------------------


def test_cells_of_a_running_and_a_stopped_agent() -> None:
    running = row("web", cpu=12.345, rss=3 * 1024 * 1024, pid=4242, started=NOW - 125, restarts=2)
    running.status.last_heartbeat_time.CopyFrom(ts(NOW - 7))
    assert row_cells(running, NOW) == ("web", "running", "4242", "2m5s", "2", "12.3", "3.0MiB", "7s ago")
    stopped = row("idle", state=STOPPED, started=NOW - 500)
    # No process: no uptime even though the last start time is known.
    assert row_cells(stopped, NOW) == ("idle", "stopped", "-", "-", "0", "-", "-", "-")


def test_log_lines_mark_stderr() -> None:
    assert log_text(pb.LogLine(line="hello\n", stream=pb.LOG_STREAM_STDOUT)) == "hello"
    assert log_text(pb.LogLine(line="boom", stream=pb.LOG_STREAM_STDERR)) == "[err] boom"


# --- the fleet ---------------------------------------------------------------------------------


def test_a_listing_adds_updates_and_drops_what_it_no_longer_has() -> None:
    fleet = Fleet()
    fleet.reconcile([agent("a", pid=1), agent("b", state=STOPPED, stop_timeout=7)], requested_at=10)
    assert set(fleet.rows) == {"a", "b"} and fleet.rows["b"].stop_timeout == 7
    fleet.reconcile([agent("a", pid=1)], requested_at=20)
    assert set(fleet.rows) == {"a"}  # b was deleted: WatchEvents does not say so


def test_news_newer_than_a_listing_is_kept() -> None:
    fleet = Fleet()
    fleet.reconcile([agent("a", pid=1)], requested_at=10)
    # An agent registered, and a change of a, after the listing below was asked for (at 20).
    fleet.put(agent("new", pid=5), now=25)
    assert fleet.apply_event(pb.AgentEvent(agent_id="a", status=status("a", STOPPED)), now=26)
    fleet.reconcile([agent("a", pid=1)], requested_at=20)
    assert "new" in fleet
    assert fleet.rows["a"].state == "stopped"


def test_events_of_unknown_agents_are_left_to_the_caller() -> None:
    fleet = Fleet()
    assert not fleet.apply_event(pb.AgentEvent(agent_id="x", status=status("x")))
    assert "x" not in fleet
    # A deletion of an agent not shown needs nothing fetched.
    assert fleet.apply_event(pb.AgentEvent(agent_id="x", deleted=True))


def test_a_deletion_event_removes_the_row_at_once() -> None:
    fleet = Fleet()
    fleet.reconcile([agent("a", pid=1), agent("b", pid=2)], requested_at=10)
    assert fleet.apply_event(pb.AgentEvent(agent_id="b", deleted=True, status=status("b", STOPPED)))
    assert set(fleet.rows) == {"a"}


def test_a_sample_belongs_to_its_process() -> None:
    fleet = Fleet()
    fleet.put(agent("a", pid=1), now=1)
    fleet.put(agent("gone", state=STOPPED), now=1)
    fleet.apply_metrics([pb.AgentMetrics(agent_id="a", cpu_percent=5, rss_bytes=10)])
    fleet.apply_metrics([pb.AgentMetrics(agent_id="gone", cpu_percent=5, rss_bytes=10)])
    assert (fleet.rows["a"].cpu_percent, fleet.rows["a"].rss_bytes) == (5, 10)
    assert fleet.rows["gone"].cpu_percent is None  # not running: a late sample is not shown
    fleet.apply_event(pb.AgentEvent(agent_id="a", status=status("a", pid=1, restarts=1)), now=2)
    assert fleet.rows["a"].cpu_percent == 5  # same process
    fleet.apply_event(pb.AgentEvent(agent_id="a", status=status("a", pid=2)), now=3)
    assert fleet.rows["a"].cpu_percent is None  # restarted: another process


def test_metrics_are_asked_for_the_shown_live_agents_only_and_bounded() -> None:
    fleet = Fleet()
    for n in range(10):
        fleet.put(agent(f"a{n}", pid=100 + n, state=RUNNING if n % 2 == 0 else STOPPED))
    shown = [f"a{n}" for n in range(10)]
    assert fleet.metric_targets(shown, limit=3) == ["a0", "a2", "a4"]
    assert fleet.metric_targets(["a8", "a9", "nobody"], limit=3) == ["a8"]


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["top"], ["--server", "/x.sock", "top", "--timeout", "3"]])
def test_top_is_a_command_of_its_own(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.command_name == "top" and callable(args.handler)
