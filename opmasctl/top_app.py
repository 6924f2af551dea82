"""The full-screen view of `opmasctl top`: a textual App over a Fleet, fed by top_feed's workers.

Everything here runs on textual's event loop and never blocks: gRPC calls run in thread workers
(Feed), whose results come back through call_from_thread.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any, ClassVar

import grpc
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.coordinate import Coordinate
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Log, Static

from opmas.v1 import agents_pb2
from opmasctl.top_feed import METRICS_PER_TICK, Closed, Feed, Link, describe
from opmasctl.top_model import COLUMNS, STATE_STYLES, Fleet, SortOrder, log_text, row_cells, sort_rows

LOG_LINES = 200
# Uptime and heartbeat ages tick once a second.
TICK_SECONDS = 1.0
# The keys of the table (hidden and off while the logs are shown).
TABLE_ACTIONS = frozenset({"next_sort", "reverse", "sort_by", "operate", "logs"})
# Exit status of Ctrl-C, as for the other commands: 128 + SIGINT.
INTERRUPTED = 130


class LogScreen(Screen[None]):
    """The last lines of one agent's log, over the table; Escape goes back."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "back")]

    def __init__(self, top: TopApp, agent_id: str) -> None:
        super().__init__()
        self._top = top
        self._agent_id = agent_id

    def compose(self) -> ComposeResult:
        yield Static(f"logs of {self._agent_id} (last {LOG_LINES} lines)", id="log-title")
        yield Log(id="log", highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self.run_worker(self._load, thread=True, name=f"logs {self._agent_id}")

    def _load(self) -> None:
        try:
            lines = [log_text(line) for line in self._top.feed.logs(self._agent_id, LOG_LINES)]
            text = lines or ["(no output yet)"]
        except Closed:
            return
        except grpc.RpcError as err:
            text = [f"error: {describe(err)}"]
        try:
            self._top.post(self._show, text)
        except Closed:
            return

    def _show(self, lines: list[str]) -> None:
        self.query_one("#log", Log).write_lines(lines)


class TopApp(App[None]):
    """The table of agents, the line above it (daemon, counts, disconnection) and the one below
    it (what the last key did)."""

    TITLE = "opmasctl top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #info { height: 1; padding: 0 1; }
    #info.disconnected { background: $error; color: $text; }
    #status { height: 1; padding: 0 1; }
    #status.failed { color: $error; }
    #table { height: 1fr; }
    #log-title { height: 1; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit_top", "quit"),
        Binding("ctrl+c", "interrupt", "quit", show=False, priority=True),
        Binding("s", "next_sort", "sort"),
        Binding("r", "reverse", "reverse"),
        *[Binding(str(i + 1), f"sort_by({i})", show=False) for i in range(len(COLUMNS))],
        Binding("S", "operate('start')", "start"),
        Binding("x", "operate('stop')", "stop"),
        Binding("R", "operate('restart')", "restart"),
        Binding("l", "logs", "logs"),
    ]

    def __init__(self, link: Link, agents: list[agents_pb2.Agent], listed_at: float) -> None:
        super().__init__()
        self.link = link
        self.feed = Feed(link, self, self.post)
        self.fleet = Fleet()
        self.fleet.reconcile(agents, listed_at)
        self.order = SortOrder()
        self._shown: list[str] | None = None
        self._disconnected: str | None = None
        self._quitting = False

    # -- the thread side ---------------------------------------------------------------------

    def post(self, callback: Callable[..., Any], *args: Any) -> Any:
        """Runs callback(*args) on the UI loop from a worker thread and returns its result;
        raises Closed once top is quitting (the loop may be gone)."""
        if self._quitting:
            raise Closed
        try:
            return self.call_from_thread(callback, *args)
        except RuntimeError:
            if self._quitting:
                raise Closed from None
            raise

    # -- what the feed tells (on the UI loop) -------------------------------------------------

    def connected(self, agents: list[agents_pb2.Agent], requested_at: float) -> None:
        if self._disconnected is not None:
            self._disconnected = None
            self._set_status("reconnected")
        self.listed(agents, requested_at)

    def disconnected(self, reason: str) -> None:
        self._disconnected = reason
        self._redraw()

    def event(self, event: agents_pb2.AgentEvent) -> bool:
        known = self.fleet.apply_event(event)
        if known:
            self._redraw()
        return known

    def added(self, agent: agents_pb2.Agent) -> None:
        self.fleet.put(agent)
        self._redraw()

    def listed(self, agents: list[agents_pb2.Agent], requested_at: float) -> None:
        self.fleet.reconcile(agents, requested_at)
        self._redraw()

    def sampled(self, samples: list[agents_pb2.AgentMetrics]) -> None:
        self.fleet.apply_metrics(samples)
        self._redraw()

    def metric_targets(self) -> list[str]:
        table = self._table()
        shown = self._shown or []
        first = int(table.scroll_y)
        return self.fleet.metric_targets(shown[first : first + max(table.size.height, 1)], METRICS_PER_TICK)

    def problem(self, text: str) -> None:
        self._set_status(text, failed=True)

    # -- the screen -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="info")
        table: DataTable[str | Text] = DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self._redraw()
        self._table().focus()
        self.run_worker(self.feed.watch, thread=True, name="events", group="feed")
        self.run_worker(self.feed.poll, thread=True, name="metrics", group="feed")
        self.set_interval(TICK_SECONDS, self._redraw)
        # A SIGINT from outside (the terminal's Ctrl-C arrives as a key) ends top as Ctrl-C does,
        # not as asyncio's default quiet cancellation.
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.action_interrupt)

    def on_unmount(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        self.stop_feed()

    def _table(self) -> DataTable[str | Text]:
        return self.query_one("#table", DataTable)

    def _selected(self) -> str | None:
        table = self._table()
        if not self._shown or table.row_count == 0:
            return None
        row_key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key
        return row_key.value

    def _redraw(self) -> None:
        """The table from the fleet: rebuilt when the rows or their order changed, else only the
        cells whose text changed (the cursor stays on its agent either way)."""
        if self._quitting:
            return
        now = time.time()
        table = self._table()
        rows = sort_rows(self.fleet.rows.values(), self.order, now)
        ids = [row.agent_id for row in rows]
        cells = {row.agent_id: self._cells(row_cells(row, now)) for row in rows}
        if ids != self._shown:
            selected = self._selected()
            table.clear(columns=True)
            for index in range(len(COLUMNS)):
                table.add_column(self.order.label(index), key=str(index))
            for agent_id in ids:
                table.add_row(*cells[agent_id], key=agent_id)
            self._shown = ids
            if selected in ids:
                table.move_cursor(row=ids.index(selected), animate=False)
        else:
            for agent_id in ids:
                for index, cell in enumerate(cells[agent_id]):
                    if table.get_cell(agent_id, str(index)) != cell:
                        table.update_cell(agent_id, str(index), cell)
        self._redraw_info()

    @staticmethod
    def _cells(texts: tuple[str, ...]) -> list[str | Text]:
        state = texts[1]
        return [*texts[:1], Text(state, style=STATE_STYLES.get(state, "")), *texts[2:]]

    def _redraw_info(self) -> None:
        info = self.query_one("#info", Static)
        if self._disconnected is not None:
            info.update(
                f"disconnected: {self._disconnected} (retrying every second) · {self.link.endpoint.display}"
            )
            info.add_class("disconnected")
            return
        total, running = self.fleet.counts()
        column = COLUMNS[self.order.column].label
        direction = "descending" if self.order.descending else "ascending"
        agents = f"{total} agent{'' if total == 1 else 's'}"
        info.update(
            f"opmasd {self.link.endpoint.display} · {agents}, {running} running · "
            f"sorted by {column} {direction}"
        )
        info.remove_class("disconnected")

    def _set_status(self, text: str, failed: bool = False) -> None:
        if self._quitting:
            return
        status = self.query_one("#status", Static)
        status.update(Text(text))
        status.set_class(failed, "failed")

    # -- keys -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The table's keys act on the table only: not while the logs cover it."""
        if action in TABLE_ACTIONS and isinstance(self.screen, LogScreen):
            return False
        return True

    def action_next_sort(self) -> None:
        self.order = self.order.next()
        self._redraw()

    def action_sort_by(self, column: int) -> None:
        self.order = self.order.pick(column)
        self._redraw()

    def action_reverse(self) -> None:
        self.order = self.order.reversed()
        self._redraw()

    def action_operate(self, verb: str) -> None:
        agent_id = self._selected()
        if agent_id is None:
            self._set_status(f"no agent selected to {verb}", failed=True)
            return
        row = self.fleet.rows[agent_id]
        self._set_status(f"{verb} {agent_id}…")
        self.run_worker(
            lambda: self._operate(verb, agent_id, row.stop_timeout),
            thread=True,
            name=f"{verb} {agent_id}",
            group="operations",
        )

    def _operate(self, verb: str, agent_id: str, stop_timeout: float | None) -> None:
        try:
            line, failed = self.feed.operate(verb, agent_id, stop_timeout), False
        except Closed:
            return
        except grpc.RpcError as err:
            line, failed = f"{verb} {agent_id} failed: {describe(err)}", True
        try:
            self.post(self._set_status, line, failed)
        except Closed:
            return

    def action_logs(self) -> None:
        agent_id = self._selected()
        if agent_id is None:
            self._set_status("no agent selected", failed=True)
            return
        self.push_screen(LogScreen(self, agent_id))

    def action_quit_top(self) -> None:
        self.stop_feed()
        self.exit()

    def action_interrupt(self) -> None:
        self.stop_feed()
        self.exit(return_code=INTERRUPTED)

    def stop_feed(self) -> None:
        """Ends the workers at once: no new call, those in flight cancelled. textual's thread
        workers run in asyncio's default executor, which the interpreter joins at exit: none may
        stay blocked in a call (a stop waiting out an agent's stop_timeout, the event stream)."""
        if not self._quitting:
            self._quitting = True
            self.feed.stop()
