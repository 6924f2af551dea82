"""Human views of the API's messages: the agent table, key/value pages, event lines."""

from __future__ import annotations

import json
import shlex
import signal
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from google.protobuf import json_format, message, struct_pb2

from opmas.v1 import agents_pb2
from opmasctl.output import (
    EMPTY,
    clock_text,
    duration_text,
    enum_text,
    human_bytes,
    human_duration,
    key_values,
    plain_numbers,
    timestamp_text,
)
from opmasctl.spec_privileges import privilege_pairs
from opmasctl.tables import CYAN, GREEN, PLAIN, RED, YELLOW, TableStyle, render

_LIVE_STATES = {
    agents_pb2.AGENT_STATE_STARTING,
    agents_pb2.AGENT_STATE_RUNNING,
    agents_pb2.AGENT_STATE_STOPPING,
    agents_pb2.AGENT_STATE_INACTIVE,
}


def state_text(state: agents_pb2.AgentState.ValueType) -> str:
    return enum_text(agents_pb2.AgentState.Name(state), "AGENT_STATE_")


def desired_text(state: agents_pb2.DesiredState.ValueType) -> str:
    return enum_text(agents_pb2.DesiredState.Name(state), "DESIRED_STATE_")


def policy_text(policy: agents_pb2.RestartPolicy.ValueType) -> str:
    return enum_text(agents_pb2.RestartPolicy.Name(policy), "RESTART_POLICY_")


def runtime_text(kind: agents_pb2.RuntimeKind.ValueType) -> str:
    return enum_text(agents_pb2.RuntimeKind.Name(kind), "RUNTIME_KIND_")


def source_text(source: agents_pb2.AgentSource.ValueType) -> str:
    return enum_text(agents_pb2.AgentSource.Name(source), "AGENT_SOURCE_")


def _text(value: str) -> str:
    return value or EMPTY


def _number(value: int) -> str:
    return str(value) if value else EMPTY


def uptime_text(status: agents_pb2.AgentStatus, now: datetime | None = None) -> str:
    if status.HasField("uptime") and status.uptime.ToNanoseconds() > 0:
        return human_duration(int(status.uptime.ToNanoseconds() // 1_000_000_000))
    # A server that leaves uptime out still gives start_time; only meaningful while alive.
    if status.state in _LIVE_STATES and status.HasField("start_time"):
        now = now or datetime.now(UTC)
        seconds = (now - status.start_time.ToDatetime(tzinfo=UTC)).total_seconds()
        if seconds >= 0:
            return human_duration(int(seconds))
    return EMPTY


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def last_exit_short(status: agents_pb2.AgentStatus) -> str:
    if not status.HasField("last_exit"):
        return EMPTY
    exit_info = status.last_exit
    if exit_info.signal:
        return _signal_name(exit_info.signal)
    if not exit_info.exit_code and "status unknown" in exit_info.reason:
        return "unknown"  # an adopted process: 0 on the wire, not an exit status of 0
    return f"exit {exit_info.exit_code}"


def last_exit_long(status: agents_pb2.AgentStatus) -> str:
    if not status.HasField("last_exit"):
        return EMPTY
    text = last_exit_short(status)
    exit_info = status.last_exit
    if exit_info.reason:
        text += f": {exit_info.reason}"
    if exit_info.HasField("time"):
        text += f" at {timestamp_text(exit_info.time)}"
    return text


def heartbeat_age(status: agents_pb2.AgentStatus, now: datetime | None = None) -> str:
    """How long ago the last heartbeat came, e.g. 12s; - when none came."""
    if not status.HasField("last_heartbeat_time"):
        return EMPTY
    now = now or datetime.now(UTC)
    seconds = (now - status.last_heartbeat_time.ToDatetime(tzinfo=UTC)).total_seconds()
    return human_duration(max(int(seconds), 0))


Column = tuple[str, Callable[[agents_pb2.Agent], str]]
# Free text, cut first (or alone) to fit a terminal; the id and status columns stay whole.
ELASTIC = frozenset({"NAME", "TYPE", "LAST EXIT", "NODE", "COMMAND"})
# The agent table. NAME is left to -o wide: it is the id unless set apart on purpose, so in the
# default table it mostly repeated the ID column.
AGENT_COLUMNS: tuple[Column, ...] = (
    ("ID", lambda agent: agent.agent_id),
    ("TYPE", lambda agent: _text(agent.spec.type)),
    ("STATE", lambda agent: state_text(agent.status.state)),
    ("DESIRED", lambda agent: desired_text(agent.status.desired_state)),
    ("PID", lambda agent: _number(agent.status.pid)),
    ("UPTIME", lambda agent: uptime_text(agent.status)),
    ("RESTARTS", lambda agent: str(agent.status.restart_count)),
    ("LAST EXIT", lambda agent: last_exit_short(agent.status)),
)
# -o wide: NAME after ID, then these after the default columns.
NAME_COLUMN: Column = ("NAME", lambda agent: _text(agent.spec.name))
WIDE_COLUMNS: tuple[Column, ...] = (
    ("NODE", lambda agent: _text(agent.status.node or agent.node)),
    ("RUNTIME", lambda agent: runtime_text(agent.status.runtime or agent.spec.runtime)),
    ("LAST HEARTBEAT", lambda agent: heartbeat_age(agent.status)),
    ("COMMAND", lambda agent: shlex.join(agent.spec.command) if agent.spec.command else EMPTY),
)
STATE_COLOURS = {
    "running": GREEN,
    "starting": CYAN,
    "stopping": CYAN,
    "backoff": YELLOW,
    "inactive": YELLOW,
    "error": RED,
}


def agent_columns(wide: bool = False) -> tuple[Column, ...]:
    if not wide:
        return AGENT_COLUMNS
    return (AGENT_COLUMNS[0], NAME_COLUMN, *AGENT_COLUMNS[1:], *WIDE_COLUMNS)


def agent_row(agent: agents_pb2.Agent, wide: bool = False) -> list[str]:
    return [cell(agent) for _, cell in agent_columns(wide)]


def agents_table(agents: Sequence[agents_pb2.Agent], style: TableStyle = PLAIN) -> str:
    """The table of agents; empty when there are none (the caller says so on stderr)."""
    if not agents:
        return ""
    columns = agent_columns(style.wide)
    headers = [header for header, _ in columns]
    state = headers.index("STATE")
    rows = [[cell(agent) for _, cell in columns] for agent in agents]
    elastic = [index for index, header in enumerate(headers) if header in ELASTIC]
    return render(headers, rows, style, colours={state: STATE_COLOURS}, elastic=elastic)


def _time(msg: message.Message, field: str) -> str:
    """A Timestamp field with its age, or "-" when unset."""
    if not msg.HasField(field):
        return EMPTY
    return timestamp_text(getattr(msg, field))


def _environment(env: dict[str, str]) -> str:
    return "\n".join(f"{key}={env[key]}" for key in sorted(env)) or EMPTY


def spec_pairs(spec: agents_pb2.AgentSpec) -> list[tuple[str, str]]:
    limits = spec.resources
    return [
        ("Name", _text(spec.name)),
        ("Type", _text(spec.type)),
        ("Version", _text(spec.version)),
        ("Description", _text(spec.description)),
        ("Command", shlex.join(spec.command) if spec.command else EMPTY),
        ("Working dir", _text(spec.working_directory)),
        ("Environment", _environment(dict(spec.environment))),
        ("Restart policy", policy_text(spec.restart_policy)),
        ("Stop timeout", duration_text(spec.stop_timeout) if spec.HasField("stop_timeout") else EMPTY),
        (
            "Heartbeat interval",
            duration_text(spec.heartbeat_interval) if spec.HasField("heartbeat_interval") else EMPTY,
        ),
        ("Start seconds", duration_text(spec.start_seconds) if spec.HasField("start_seconds") else EMPTY),
        ("Runtime", runtime_text(spec.runtime)),
        ("Autostart", "yes" if spec.autostart else "no"),
        ("Restart on inactive", "yes" if spec.restart_on_inactive else "no"),
        ("Memory max", human_bytes(limits.memory_max_bytes) if limits.memory_max_bytes else EMPTY),
        ("CPU quota", f"{limits.cpu_quota_percent:g}%" if limits.cpu_quota_percent else EMPTY),
        ("Tasks max", _number(limits.tasks_max)),
        ("Open files max", _number(limits.open_files_max)),
        *privilege_pairs(spec),
    ]


def status_pairs(status: agents_pb2.AgentStatus) -> list[tuple[str, str]]:
    return [
        ("State", state_text(status.state)),
        ("Desired", desired_text(status.desired_state)),
        ("Reason", _text(status.state_reason)),
        ("Since", _time(status, "state_change_time")),
        ("PID", _number(status.pid)),
        ("Started", _time(status, "start_time")),
        ("Uptime", uptime_text(status)),
        ("Restarts", str(status.restart_count)),
        ("Last exit", last_exit_long(status)),
        ("Last heartbeat", _time(status, "last_heartbeat_time")),
        ("Next restart", _time(status, "next_restart_time")),
        ("Node", _text(status.node)),
        ("Runtime", runtime_text(status.runtime)),
    ]


def agent_view(agent: agents_pb2.Agent) -> str:
    pairs = [("ID", agent.agent_id)]
    pairs += spec_pairs(agent.spec)
    pairs += [
        ("Source", source_text(agent.source)),
        ("Manifest", _text(agent.manifest_path)),
        ("Node", _text(agent.node)),
        ("Created", _time(agent, "create_time")),
        ("Updated", _time(agent, "update_time")),
    ]
    # The status block repeats Node/Runtime as the status sees them; the spec's are kept above.
    pairs += [(key, value) for key, value in status_pairs(agent.status) if key not in ("Node", "Runtime")]
    return key_values(pairs)


def status_view(status: agents_pb2.AgentStatus) -> str:
    return key_values([("ID", status.agent_id), *status_pairs(status)])


def _struct_lines(struct: struct_pb2.Struct) -> str:
    data = plain_numbers(json_format.MessageToDict(struct))
    return "\n".join(f"{key}={json.dumps(data[key])}" for key in sorted(data)) or EMPTY


def metrics_view(metrics: agents_pb2.AgentMetrics) -> str:
    return key_values(
        [
            ("ID", metrics.agent_id),
            ("CPU", f"{metrics.cpu_percent:.1f}%"),
            ("RSS", human_bytes(metrics.rss_bytes) if metrics.rss_bytes else EMPTY),
            ("Threads", _number(metrics.num_threads)),
            ("Open files", _number(metrics.open_fds)),
            ("Uptime", duration_text(metrics.uptime) if metrics.HasField("uptime") else EMPTY),
            ("Restarts", str(metrics.restart_count)),
            ("Reported", _struct_lines(metrics.reported)),
            ("Reported at", _time(metrics, "reported_time")),
        ]
    )


def discover_view(response: agents_pb2.DiscoverAgentsResponse, style: TableStyle = PLAIN) -> str:
    if response.agents:
        text = render(
            ("ID", "NAME", "NEW", "MANIFEST"),
            [
                [found.agent_id, _text(found.name), "yes" if found.new else "no", _text(found.manifest_path)]
                for found in response.agents
            ],
            style,
        )
    else:
        text = "no agents found\n"
    if response.errors:
        text += "\n" + render(
            ("MANIFEST", "ERROR"),
            [[error.manifest_path, error.message] for error in response.errors],
            style,
        )
    return text


def event_line(event: agents_pb2.AgentEvent) -> str:
    when = clock_text(event.time) if event.HasField("time") else EMPTY
    change = "deleted" if event.deleted else f"{state_text(event.previous_state)} → {state_text(event.state)}"
    parts = [when, event.agent_id, change]
    if event.reason:
        parts.append(event.reason)
    return "  ".join(parts) + "\n"
