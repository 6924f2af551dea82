"""JSON ↔ values for the payloads of DESIGN §5, strict on the way in, in one place.

Anything on the bus can send anything, so decoding checks size before parsing, then every
field's type, and says exactly what is wrong (MalformedMessage.reason) so whoever reads the
log can fix the sender. Unknown extra fields are ignored: senders may add their own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opmasd.core.clock import rfc3339, utcnow
from opmasd.core.messages import (
    ERROR,
    SUCCESS,
    CommandReply,
    Heartbeat,
    ManagerReply,
    MetricsReport,
)

MAX_MESSAGE_BYTES = 256 * 1024
MAX_ID_LENGTH = 255
# Objects and arrays nested deeper than this are refused: what the API turns them into (a
# protobuf Struct) cannot hold more than 100 levels, and no message of §5 needs a tenth of it.
MAX_DEPTH = 32

# RFC 3339 date-time (section 5.6): the offset is mandatory; 't'/'z' may be lower case.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
)


class MalformedMessage(Exception):
    """A payload that is not what §5 says; reason names the field and the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CommandMessage:
    """A command: manager → agent on {p}.{id}.command, or anyone → manager.

    received_at is when it was decoded (or made); timestamp is what the sender put in it.
    """

    command: str
    agent_id: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None


@dataclass(frozen=True)
class ResponseMessage:
    status: str
    command: str = ""
    agent_id: str = ""
    result: Any = None
    error: str = ""
    # Our own addition for the manager's answers: a machine-readable error code.
    code: str = ""
    timestamp: datetime | None = None

    def to_reply(self) -> CommandReply:
        return CommandReply(status=self.status, result=self.result, error=self.error)


# -- timestamps: written by core.clock.rfc3339 (UTC, milliseconds), read in any RFC 3339 form ----


def parse_timestamp(value: object, name: str = "timestamp") -> datetime:
    if not isinstance(value, str):
        raise MalformedMessage(f"{name}: must be an RFC 3339 string, got {_kind(value)}")
    if not _RFC3339.match(value):
        raise MalformedMessage(
            f"{name}: {value[:64]!r} is not RFC 3339 (e.g. 2026-11-24T07:54:47.123Z, offset required)"
        )
    try:
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise MalformedMessage(f"{name}: {value[:64]!r} is not a valid time ({exc})") from None
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is before the first representable UTC time
        raise MalformedMessage(f"{name}: {value[:64]!r} is out of range") from None


# -- decoding helpers ---------------------------------------------------------------------------


def _kind(value: object) -> str:
    """A JSON type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _reject_constant(name: str) -> float:
    # json accepts NaN and Infinity by default; they are not JSON and break other parsers.
    raise ValueError(f"{name} is not valid JSON")


def _int64(text: str) -> int:
    # Beyond 64 bits a number cannot go into the API's messages (int64, or a Struct's double).
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"integer {text[:24]}... out of range")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} out of range")
    return value


def load_object(data: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """The JSON object in data, size-checked before parsing."""
    if len(data) > limit:
        raise MalformedMessage(f"message too large ({len(data)} bytes, limit {limit})")
    if not data.strip():
        raise MalformedMessage("not JSON: empty message")
    try:
        value = json.loads(data, parse_constant=_reject_constant, parse_int=_int64, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise MalformedMessage(f"not JSON: {detail}") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"not a JSON object: got {_kind(value)}")
    if _depth(value) > MAX_DEPTH:
        raise MalformedMessage(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _depth(value: object) -> int:
    """How deeply objects and arrays nest in value (without recursion: the value may be deep)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _string(obj: Mapping[str, Any], name: str, *, required: bool, max_length: int = 0) -> str:
    if name not in obj or obj[name] is None:
        if required:
            raise MalformedMessage(f"{name}: missing")
        return ""
    value = obj[name]
    if not isinstance(value, str):
        raise MalformedMessage(f"{name}: must be a string, got {_kind(value)}")
    if required and not value:
        raise MalformedMessage(f"{name}: must not be empty")
    if max_length and len(value) > max_length:
        raise MalformedMessage(f"{name}: longer than {max_length} characters")
    return value


def _object(obj: Mapping[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    if name not in obj or obj[name] is None:
        if required:
            raise MalformedMessage(f"{name}: missing")
        return {}
    value = obj[name]
    if not isinstance(value, dict):
        raise MalformedMessage(f"{name}: must be an object, got {_kind(value)}")
    return value


def _timestamp(obj: Mapping[str, Any], *, default_now: bool) -> datetime | None:
    if "timestamp" not in obj or obj["timestamp"] is None:
        return utcnow() if default_now else None
    return parse_timestamp(obj["timestamp"])


# -- agent → manager ----------------------------------------------------------------------------


def decode_heartbeat(data: bytes) -> Heartbeat:
    """{agent_id, status, timestamp, metadata}; a missing timestamp means now."""
    obj = load_object(data)
    agent_id = _string(obj, "agent_id", required=True, max_length=MAX_ID_LENGTH)
    status = _string(obj, "status", required=True, max_length=MAX_ID_LENGTH)
    timestamp = _timestamp(obj, default_now=True)
    assert timestamp is not None
    return Heartbeat(agent_id, status, timestamp, _object(obj, "metadata", required=False))


def decode_metrics(data: bytes) -> MetricsReport:
    """{agent_id, timestamp, metrics: {...}}; a missing timestamp means now."""
    obj = load_object(data)
    agent_id = _string(obj, "agent_id", required=True, max_length=MAX_ID_LENGTH)
    timestamp = _timestamp(obj, default_now=True)
    assert timestamp is not None
    return MetricsReport(agent_id, timestamp, _object(obj, "metrics", required=True))


def check_sender(value: Heartbeat | MetricsReport, subject_agent: str) -> None:
    """MalformedMessage unless the message is about the agent whose subject it came on."""
    if value.agent_id != subject_agent:
        raise MalformedMessage(
            f"agent_id: {value.agent_id[:64]!r} is not the agent of the subject it came on "
            f"({subject_agent[:64]!r}); an agent reports only for itself"
        )


def encode_heartbeat(heartbeat: Heartbeat) -> bytes:
    return _dump(
        {
            "agent_id": heartbeat.agent_id,
            "status": heartbeat.status,
            "timestamp": rfc3339(heartbeat.timestamp),
            "metadata": dict(heartbeat.metadata),
        }
    )


def encode_metrics(report: MetricsReport) -> bytes:
    return _dump(
        {
            "agent_id": report.agent_id,
            "timestamp": rfc3339(report.timestamp),
            "metrics": dict(report.metrics),
        }
    )


# -- commands and responses ---------------------------------------------------------------------


def encode_command(
    command: str, agent_id: str = "", params: Mapping[str, Any] | None = None, now: datetime | None = None
) -> bytes:
    """The §5 command JSON. Raises TypeError/ValueError when params are not JSON-able."""
    return _dump(
        {
            "command": command,
            "agent_id": agent_id,
            "params": dict(params or {}),
            "timestamp": rfc3339(now or utcnow()),
        }
    )


def decode_command(data: bytes, limit: int = MAX_MESSAGE_BYTES) -> CommandMessage:
    obj = load_object(data, limit)
    return CommandMessage(
        command=_string(obj, "command", required=True, max_length=MAX_ID_LENGTH),
        agent_id=_string(obj, "agent_id", required=False, max_length=MAX_ID_LENGTH),
        params=_object(obj, "params", required=False),
        timestamp=_timestamp(obj, default_now=False),
    )


def encode_response(
    status: str,
    command: str = "",
    agent_id: str = "",
    result: Any = None,
    error: str = "",
    *,
    code: str = "",
    extra: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> bytes:
    """The §5 response JSON; error responses may add a code and extra fields (violations)."""
    if status not in (SUCCESS, ERROR):
        raise ValueError(f"response status must be {SUCCESS!r} or {ERROR!r}, not {status!r}")
    body: dict[str, Any] = {
        "status": status,
        "command": command,
        "agent_id": agent_id,
        "result": result,
        "error": error or None,
        "timestamp": rfc3339(now or utcnow()),
    }
    if code:
        body["code"] = code
    body.update(extra or {})
    return _dump(body)


def encode_manager_reply(reply: ManagerReply, now: datetime | None = None) -> bytes:
    """The manager's answer as a §5 response; violations and resource become fields of their own."""
    extra: dict[str, Any] = {}
    if reply.violations is not None:
        extra["violations"] = [{"field": v.field, "description": v.description} for v in reply.violations]
    if reply.resource is not None:
        extra["resource"] = {"type": reply.resource[0], "name": reply.resource[1]}
    return encode_response(
        reply.status,
        reply.command,
        reply.agent_id,
        reply.result,
        reply.error,
        code=reply.code,
        extra=extra,
        now=now,
    )


def decode_response(data: bytes) -> ResponseMessage:
    obj = load_object(data)
    status = _string(obj, "status", required=True)
    if status not in (SUCCESS, ERROR):
        raise MalformedMessage(f"status: must be {SUCCESS!r} or {ERROR!r}, got {status[:32]!r}")
    error = _string(obj, "error", required=False)
    if status == ERROR and not error:
        error = "the agent reported an error without a message"
    return ResponseMessage(
        status=status,
        command=_string(obj, "command", required=False, max_length=MAX_ID_LENGTH),
        agent_id=_string(obj, "agent_id", required=False, max_length=MAX_ID_LENGTH),
        result=obj.get("result"),
        error=error,
        code=_string(obj, "code", required=False, max_length=MAX_ID_LENGTH),
        timestamp=_timestamp(obj, default_now=False),
    )


def _dump(body: Mapping[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON; a metric that is NaN must fail here, not in a reader.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
