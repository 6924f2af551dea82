"""Generic rendering: key/value views, JSON and YAML, human durations and sizes (tables: tables.py)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml
from google.protobuf import duration_pb2, message, timestamp_pb2

from opmas.jsonmap import message_json

# table and wide are for people (wide: more columns); json and yaml are the REST API's
# documents; name is one agent id a line, for the next command.
FORMATS = ("table", "wide", "json", "yaml", "name")
HUMAN_FORMATS = ("table", "wide")
EMPTY = "-"
# What a terminal would act on instead of showing: C0 controls but tab (ESC starts escape
# sequences that can move the cursor, rewrite the screen or the window title, answer with
# keystrokes; CR and BS overwrite what was shown), DEL, and the C1 controls (U+0080..U+009F,
# CSI among them, which some terminals take as ESC [).
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def message_to_dict(msg: message.Message) -> Any:
    """The message as the REST API writes it (opmas.jsonmap): lowerCamelCase names, enum names,
    every field present, so `-o json` and curl give a script the same document."""
    return message_json(msg)


def plain_numbers(value: Any) -> Any:
    """Struct/Value numbers are doubles: show 10.0 as 10 in human output (JSON/YAML keep them)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_numbers(item) for item in value]
    return value


def dump(data: Any, fmt: str) -> str:
    """A whole document in json or yaml, ending with a newline."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_item(data: Any, fmt: str) -> str:
    """One item of a stream: a single JSON line (NDJSON), or one YAML document."""
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
    return yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False, allow_unicode=True, explicit_start=True
    )


def write(text: str) -> None:
    # Flushed at once: streamed logs and events must show up while the command still runs.
    sys.stdout.write(text)
    sys.stdout.flush()


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """`Key:  value` lines, values aligned; a multi-line value continues under its first line."""
    width = max((len(key) for key, _ in pairs), default=0) + 2
    lines = []
    for key, value in pairs:
        # Values carry what agents wrote (a reason naming a process's command line): shown, never
        # obeyed by the terminal; a multi-line value keeps its lines.
        first, *rest = (visible_controls(line) for line in (value or EMPTY).split("\n"))
        lines.append(f"{key + ':':<{width}}{first}".rstrip())
        lines.extend(" " * width + line for line in rest)
    return "\n".join(lines) + "\n"


def enum_text(name: str, prefix: str) -> str:
    """AGENT_STATE_RUNNING → running, RESTART_POLICY_ON_FAILURE → on-failure, *_UNSPECIFIED → -."""
    if not name or name.endswith("_UNSPECIFIED"):
        return EMPTY
    return name.removeprefix(prefix).lower().replace("_", "-")


def human_duration(seconds: float) -> str:
    """1h2m3s, 45s, 2d3h0m5s; sub-second values (timeouts) keep their fraction: 0.5s, 1.5s."""
    if seconds < 0:
        return "-" + human_duration(-seconds)
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h{minutes}m{secs}s"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def duration_text(duration: duration_pb2.Duration) -> str:
    return human_duration(duration.ToNanoseconds() / 1e9)


def human_bytes(count: int) -> str:
    """1536 → 1.5KiB; powers of 1024, like the --memory-max flag accepts."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def timestamp_text(ts: timestamp_pb2.Timestamp, now: datetime | None = None) -> str:
    """RFC 3339 UTC with the age, e.g. 2025-05-01T10:00:00Z (5m3s ago)."""
    when = ts.ToDatetime(tzinfo=UTC)
    now = now or datetime.now(UTC)
    delta = (now - when).total_seconds()
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    if delta >= 0:
        return f"{stamp} ({human_duration(int(delta))} ago)"
    return f"{stamp} (in {human_duration(int(-delta))})"


def clock_text(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span_text(seconds: float) -> str:
    """A rough span as a table shows an age: 45s, 12m, 5h, 30d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{round(seconds / size)}{unit}"
    return f"{int(seconds)}s"


def relative_text(ts: timestamp_pb2.Timestamp, now: datetime) -> str:
    """A time as a table shows it: 3d ago, or in 27d (-o wide shows clock_text instead)."""
    delta = (ts.ToDatetime(tzinfo=UTC) - now).total_seconds()
    return f"in {span_text(delta)}" if delta > 0 else f"{span_text(-delta)} ago"


def visible_controls(text: str) -> str:
    """`text` with every control character a terminal would act on written as `\\xNN` (tab
    kept): another program's output (an agent's log line) shown, never obeyed."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
