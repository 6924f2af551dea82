"""JSON-able ↔ domain conversions for the NATS manager API: request params in, results out.

The NATS API's counterpart of api/convert.py (protobuf). Params arrive as decoded JSON of any
shape, so each reader checks its type and a wrong one is a BadRequest naming the field;
records leave as plain dicts the bus writes as JSON, times as RFC 3339 (core.clock).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from opmasd.core import errors
from opmasd.core.clock import SYSTEM_CLOCK, rfc3339
from opmasd.core.model import AgentRecord
from opmasd.manager import DiscoveryReport, OperationResult


class BadRequest(errors.InvalidArgument):
    """The request itself is wrong (not the manager's verdict on it): counted as malformed."""


# -- request parameters -------------------------------------------------------------------------


def is_finite_number(value: object) -> bool:
    """A JSON number that is not a boolean (bool is an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def param_str(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest.single(f"params.{name}", "must be a string")
    return value


def param_seconds(params: Mapping[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if not is_finite_number(value):
        raise BadRequest.single(f"params.{name}", "must be a number of seconds")
    return float(value)


def require_agent_id(agent_id: str) -> str:
    if not agent_id:
        raise BadRequest.single("agent_id", "missing: this command acts on one agent")
    return agent_id


# -- results ------------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


def agent_to_json(rec: AgentRecord, *, with_spec: bool = False) -> dict[str, Any]:
    uptime = rec.uptime(SYSTEM_CLOCK.monotonic())
    out: dict[str, Any] = {
        "agent_id": rec.agent_id,
        "name": rec.spec.name,
        "type": rec.spec.type,
        "version": rec.spec.version,
        "node": rec.node,
        "state": rec.state.value,
        "desired_state": rec.desired.value,
        "state_reason": rec.state_reason,
        "state_changed_at": _time(rec.state_changed_at),
        "pid": rec.pid,
        "uptime_seconds": round(uptime, 3) if uptime is not None else None,
        "restart_count": rec.restart_count,
        "last_exit": (
            {
                "exit_code": rec.last_exit.exit_code,
                "signal": rec.last_exit.signal,
                "reason": rec.last_exit.reason,
                "time": _time(rec.last_exit.time),
            }
            if rec.last_exit is not None
            else None
        ),
        "last_heartbeat": _time(rec.last_heartbeat),
        "source": rec.source.value,
        "manifest_path": rec.manifest_path,
        "runtime": rec.spec.runtime.value,
        "labels": rec.spec.label_map,
    }
    if with_spec:
        out["spec"] = rec.spec.to_dict()
        out["created_at"] = _time(rec.created_at)
        out["updated_at"] = _time(rec.updated_at)
    return out


def operation_to_json(result: OperationResult) -> dict[str, Any]:
    return {"changed": result.changed, "message": result.message, "agent": agent_to_json(result.record)}


def deletion_to_json(result: OperationResult) -> dict[str, Any]:
    return {"agent_id": result.record.agent_id, "deleted": result.changed, "message": result.message}


def discovery_to_json(report: DiscoveryReport) -> dict[str, Any]:
    return {
        "agents": [
            {"agent_id": a.agent_id, "name": a.name, "manifest_path": a.manifest_path, "new": a.new}
            for a in report.agents
        ],
        "errors": [{"manifest_path": str(e.path), "message": e.message} for e in report.errors],
    }
