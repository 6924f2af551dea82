"""Protobuf ↔ domain conversions, in one place.

Incoming messages become plain values the manager understands (an unknown enum number or a
bad field mask is an InvalidArgument naming the field); domain records become messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from opmas.v1 import agents_pb2 as pb
from opmasd.api.privileges_convert import MASK_PATHS as PRIVILEGE_PATHS
from opmasd.api.privileges_convert import privilege_fields, sandbox_to_pb
from opmasd.core.clock import SYSTEM_CLOCK
from opmasd.core.errors import FieldViolation, InvalidArgument
from opmasd.core.labels import Selector, selector_field
from opmasd.core.logs import LogEntry, LogStream
from opmasd.core.messages import MetricsReport
from opmasd.core.model import (
    AgentRecord,
    AgentSource,
    AgentSpec,
    AgentState,
    DesiredState,
    ExitInfo,
    ProcessUsage,
    RestartPolicy,
    RuntimeKind,
    Transition,
)
from opmasd.manager import AgentEvent

E = TypeVar("E")

_STATE_TO_PB = {
    AgentState.STARTING: pb.AGENT_STATE_STARTING,
    AgentState.RUNNING: pb.AGENT_STATE_RUNNING,
    AgentState.STOPPING: pb.AGENT_STATE_STOPPING,
    AgentState.STOPPED: pb.AGENT_STATE_STOPPED,
    AgentState.ERROR: pb.AGENT_STATE_ERROR,
    AgentState.INACTIVE: pb.AGENT_STATE_INACTIVE,
    AgentState.BACKOFF: pb.AGENT_STATE_BACKOFF,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_DESIRED_TO_PB = {
    DesiredState.RUNNING: pb.DESIRED_STATE_RUNNING,
    DesiredState.STOPPED: pb.DESIRED_STATE_STOPPED,
}
_POLICY_TO_PB = {
    RestartPolicy.NEVER: pb.RESTART_POLICY_NEVER,
    RestartPolicy.ON_FAILURE: pb.RESTART_POLICY_ON_FAILURE,
    RestartPolicy.ALWAYS: pb.RESTART_POLICY_ALWAYS,
}
_POLICY_FROM_PB = {v: k for k, v in _POLICY_TO_PB.items()}
_RUNTIME_TO_PB = {RuntimeKind.PROCESS: pb.RUNTIME_KIND_PROCESS, RuntimeKind.SYSTEMD: pb.RUNTIME_KIND_SYSTEMD}
_RUNTIME_FROM_PB = {v: k for k, v in _RUNTIME_TO_PB.items()}
_SOURCE_TO_PB = {
    AgentSource.DISCOVERED: pb.AGENT_SOURCE_DISCOVERED,
    AgentSource.REGISTERED: pb.AGENT_SOURCE_REGISTERED,
}

# AgentSpec fields an update_mask may name, with the AgentSpec (domain) field they change.
_SCALAR_FIELDS = (
    "name",
    "type",
    "version",
    "description",
    "working_directory",
    "autostart",
    "restart_on_inactive",
    "user",
    "group",
)
_RESOURCE_FIELDS = ("memory_max_bytes", "cpu_quota_percent", "tasks_max", "open_files_max")
SPEC_MASK_PATHS = frozenset(
    (
        *_SCALAR_FIELDS,
        "command",
        "environment",
        "labels",
        "restart_policy",
        "stop_timeout",
        "heartbeat_interval",
        "start_seconds",
        "runtime",
        "resources",
        *(f"resources.{name}" for name in _RESOURCE_FIELDS),
        *PRIVILEGE_PATHS,
    )
)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def when(ts: timestamp_pb2.Timestamp, field: str = "since") -> datetime:
    """A request's Timestamp as an aware UTC datetime; one out of datetime's range is a field
    error (protobuf allows years 1-9999, but not every nanos/seconds pair converts)."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument.single(field, f"is not a valid timestamp: {exc}") from None


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def state_to_pb(state: AgentState) -> pb.AgentState.ValueType:
    return _STATE_TO_PB[state]


def _from_pb(table: Mapping[Any, E], value: int, field: str, expected: str) -> E:
    """The domain value of a proto enum number; an unknown number is a field error."""
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument.single(field, f"{value} {expected}") from None


def label_selector(text: str) -> Selector:
    """A request's label_selector; INVALID_ARGUMENT naming what does not parse."""
    return selector_field(text)


def state_from_pb(value: int, field: str = "state") -> AgentState | None:
    if value == pb.AGENT_STATE_UNSPECIFIED:
        return None
    return _from_pb(_STATE_FROM_PB, value, field, "is not a known agent state")


def _policy_from_pb(value: int) -> RestartPolicy:
    expected = "is not one of RESTART_POLICY_NEVER, _ON_FAILURE, _ALWAYS"
    return _from_pb(_POLICY_FROM_PB, value, "spec.restart_policy", expected)


def _runtime_from_pb(value: int) -> RuntimeKind:
    expected = "is not one of RUNTIME_KIND_PROCESS, RUNTIME_KIND_SYSTEMD"
    return _from_pb(_RUNTIME_FROM_PB, value, "spec.runtime", expected)


def spec_fields(spec: pb.AgentSpec, mask: list[str] | None = None) -> dict[str, Any]:
    """The spec fields a request sets, as AgentSpec field names → domain values.

    Without a mask: every field with a non-default value (what CreateAgent and an UpdateAgent
    with an empty mask mean). With a mask: exactly the named paths, zero values included.
    """
    if mask is not None:
        unknown = [p for p in mask if p not in SPEC_MASK_PATHS]
        if unknown:
            raise InvalidArgument(
                [FieldViolation("update_mask", f"{p!r} is not a field of AgentSpec") for p in unknown]
            )
        wanted = set(mask)

        def named(path: str, is_set: bool) -> bool:
            return path in wanted

    else:
        wanted = set()

        def named(path: str, is_set: bool) -> bool:
            return is_set

    out: dict[str, Any] = {}
    for name in _SCALAR_FIELDS:
        value = getattr(spec, name)
        if named(name, bool(value)):
            out[name] = value
    if named("command", len(spec.command) > 0):
        out["command"] = tuple(spec.command)
    if named("environment", len(spec.environment) > 0):
        out["environment"] = dict(spec.environment)
    if named("labels", len(spec.labels) > 0):
        out["labels"] = dict(spec.labels)
    if named("restart_policy", spec.restart_policy != pb.RESTART_POLICY_UNSPECIFIED):
        out["restart_policy"] = _policy_from_pb(spec.restart_policy)
    if named("runtime", spec.runtime != pb.RUNTIME_KIND_UNSPECIFIED):
        # An update that names runtime but leaves it unspecified means the default.
        unset = spec.runtime == pb.RUNTIME_KIND_UNSPECIFIED
        out["runtime"] = RuntimeKind.PROCESS if unset else _runtime_from_pb(spec.runtime)
    if named("stop_timeout", spec.HasField("stop_timeout")):
        out["stop_timeout"] = seconds(spec.stop_timeout)
    if named("heartbeat_interval", spec.HasField("heartbeat_interval")):
        out["heartbeat_interval"] = seconds(spec.heartbeat_interval)
    if named("start_seconds", spec.HasField("start_seconds")):
        out["start_seconds"] = seconds(spec.start_seconds)
    resources: dict[str, Any] = {}
    for name in _RESOURCE_FIELDS:
        value = getattr(spec.resources, name)
        if named(f"resources.{name}", bool(value)) or "resources" in wanted:
            resources[name] = value
    if resources:
        out["resources"] = resources
    out.update(privilege_fields(spec, named))
    return out


def spec_to_pb(spec: AgentSpec) -> pb.AgentSpec:
    res = spec.resources
    return pb.AgentSpec(
        name=spec.name,
        type=spec.type,
        version=spec.version,
        description=spec.description,
        command=list(spec.command),
        working_directory=spec.working_directory,
        environment=spec.env,
        labels=spec.label_map,
        restart_policy=_POLICY_TO_PB[spec.restart_policy],
        stop_timeout=duration(spec.stop_timeout),
        heartbeat_interval=duration(spec.heartbeat_interval) if spec.heartbeat_interval else None,
        start_seconds=duration(spec.start_seconds),
        resources=pb.ResourceLimits(
            memory_max_bytes=res.memory_max_bytes,
            cpu_quota_percent=res.cpu_quota_percent,
            tasks_max=res.tasks_max,
            open_files_max=res.open_files_max,
        ),
        runtime=_RUNTIME_TO_PB[spec.runtime],
        autostart=spec.autostart,
        restart_on_inactive=spec.restart_on_inactive,
        user=spec.user,
        group=spec.group,
        capabilities=list(spec.capabilities),
        sandbox=sandbox_to_pb(spec.sandbox),
    )


def exit_to_pb(exit_info: ExitInfo) -> pb.ExitInfo:
    return pb.ExitInfo(
        exit_code=exit_info.exit_code or 0,
        signal=exit_info.signal or 0,
        reason=exit_info.reason,
        time=timestamp(exit_info.time),
    )


def status_to_pb(rec: AgentRecord) -> pb.AgentStatus:
    status = pb.AgentStatus(
        agent_id=rec.agent_id,
        state=_STATE_TO_PB[rec.state],
        desired_state=_DESIRED_TO_PB[rec.desired],
        state_reason=rec.state_reason,
        state_change_time=timestamp(rec.state_changed_at),
        pid=rec.pid or 0,
        restart_count=rec.restart_count,
        node=rec.node,
        runtime=_RUNTIME_TO_PB[rec.spec.runtime],
    )
    uptime = rec.uptime(SYSTEM_CLOCK.monotonic())
    if uptime is not None and rec.started_at is not None:
        status.start_time.CopyFrom(timestamp(rec.started_at))
        status.uptime.CopyFrom(duration(uptime))
    if rec.last_exit is not None:
        status.last_exit.CopyFrom(exit_to_pb(rec.last_exit))
    if rec.last_heartbeat is not None:
        status.last_heartbeat_time.CopyFrom(timestamp(rec.last_heartbeat))
    if rec.next_restart_at is not None and rec.state is AgentState.BACKOFF:
        status.next_restart_time.CopyFrom(timestamp(rec.next_restart_at))
    return status


def agent_to_pb(rec: AgentRecord) -> pb.Agent:
    return pb.Agent(
        agent_id=rec.agent_id,
        spec=spec_to_pb(rec.spec),
        status=status_to_pb(rec),
        source=_SOURCE_TO_PB[rec.source],
        manifest_path=rec.manifest_path,
        node=rec.node,
        create_time=timestamp(rec.created_at),
        update_time=timestamp(rec.updated_at),
    )


def event_to_pb(event: AgentEvent) -> pb.AgentEvent:
    t: Transition = event.transition
    return pb.AgentEvent(
        agent_id=t.agent_id,
        previous_state=_STATE_TO_PB[t.previous],
        state=_STATE_TO_PB[t.state],
        reason=t.reason,
        time=timestamp(t.at),
        status=status_to_pb(event.record),
        deleted=event.deleted,
    )


def current_event_to_pb(rec: AgentRecord) -> pb.AgentEvent:
    """An agent's state now, as an event from no state (WatchEvents' initial_states)."""
    return pb.AgentEvent(
        agent_id=rec.agent_id,
        state=_STATE_TO_PB[rec.state],
        reason=rec.state_reason,
        time=timestamp(rec.state_changed_at),
        status=status_to_pb(rec),
    )


# Deeper than this, a value is not a command parameter but an attack on the recursion limit.
MAX_PARAMS_DEPTH = 16


def struct_to_dict(value: struct_pb2.Struct, field: str = "params") -> dict[str, Any]:
    """Command parameters as plain values; non-finite numbers and deep nesting are a field
    error (JSON has no NaN, and the agent must be able to read what it is sent)."""
    _check_struct(value, field, 1)
    return json_format.MessageToDict(value)


def _check_struct(value: struct_pb2.Struct | struct_pb2.ListValue, field: str, depth: int) -> None:
    if depth > MAX_PARAMS_DEPTH:
        raise InvalidArgument.single(field, f"is nested deeper than {MAX_PARAMS_DEPTH} levels")
    items = value.fields.values() if isinstance(value, struct_pb2.Struct) else value.values
    for item in items:
        kind = item.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(item.number_value):
            raise InvalidArgument.single(field, f"holds {item.number_value}, which is not a finite number")
        elif kind == "struct_value":
            _check_struct(item.struct_value, field, depth + 1)
        elif kind == "list_value":
            _check_struct(item.list_value, field, depth + 1)


def to_value(data: Any) -> struct_pb2.Value:
    """A JSON-like Python value (from a NATS reply) as google.protobuf.Value."""
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def metrics_to_pb(
    rec: AgentRecord, usage: ProcessUsage | None, reported: MetricsReport | None = None
) -> pb.AgentMetrics:
    metrics = pb.AgentMetrics(agent_id=rec.agent_id, restart_count=rec.restart_count)
    if reported is not None:
        json_format.ParseDict(dict(reported.metrics), metrics.reported)
        metrics.reported_time.CopyFrom(timestamp(reported.timestamp))
    if usage is not None:
        metrics.cpu_percent = usage.cpu_percent
        metrics.rss_bytes = usage.rss_bytes
        metrics.num_threads = usage.num_threads
        metrics.open_fds = usage.open_fds
    uptime = rec.uptime(SYSTEM_CLOCK.monotonic())
    if uptime is not None:
        metrics.uptime.CopyFrom(duration(uptime))
    return metrics


_LOG_STREAMS = {
    LogStream.UNKNOWN: pb.LOG_STREAM_UNSPECIFIED,
    LogStream.STDOUT: pb.LOG_STREAM_STDOUT,
    LogStream.STDERR: pb.LOG_STREAM_STDERR,
    LogStream.OPMASD: pb.LOG_STREAM_OPMASD,
}


def log_line_to_pb(agent_id: str, entry: LogEntry) -> pb.LogLine:
    line = pb.LogLine(agent_id=agent_id, line=entry.text, stream=_LOG_STREAMS[entry.stream])
    if entry.time is not None:
        line.time.CopyFrom(timestamp(entry.time))
    return line
