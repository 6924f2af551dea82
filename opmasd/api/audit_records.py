"""What goes into the audit trail for a call: the record of an operation that changes something,
made from the caller, the request and the result, with secrets redacted.

The gate (api.auth) knows which RPCs change something: those whose declared role is above
viewer. Their records are made here, as the call is answered, for gRPC and REST (api.
auth_interceptor) and NATS (api.nats_api); refusals of any RPC are handed over as refusals (the
trail folds a burst of them into one record). The manager keeps the records (manager.audit).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.message import Message

from opmasd.core.audit import MAX_MESSAGE, MAX_PARAMETERS_BYTES, MAX_TARGET, AuditRecord
from opmasd.core.auth import Caller, Role
from opmasd.core.clock import SYSTEM_CLOCK, Clock

REDACTED = "<redacted>"
# A field whose name says it holds a secret has its value redacted wherever it is.
_SECRET_NAME = re.compile(r"pass(word|wd|phrase)?|secret|token|credential|api[_-]?key|private[_-]?key", re.I)
# Fields whose values are all secrets or free text that may be: an agent's environment.
_SECRET_MAPS = frozenset({"environment", "env"})
REFUSALS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
# RPCs named so only read (AIP-131/132/134 verbs); the rest of an operator's or admin's change.
READS = ("List", "Get", "Watch")


class Trail(Protocol):
    """Where records go (manager.audit.AuditTrail)."""

    def record(self, rec: AuditRecord) -> None: ...

    def refused(
        self, actor: str, peer: str, entry_point: str, operation: str, result: str, message: str
    ) -> None: ...


class Auditor:
    def __init__(self, trail: Trail, roles: Mapping[str, Role | None], clock: Clock = SYSTEM_CLOCK) -> None:
        self._trail = trail
        self._roles = roles
        self._clock = clock

    def audited(self, grpc_path: str) -> bool:
        """Whether a call of this RPC is recorded when it is answered: it changes something (its
        role is above viewer and it is not a read, such as an admin's ListTokens)."""
        role = self._roles.get(grpc_path)
        read = grpc_path.rpartition("/")[2].startswith(READS)
        return role is None or (role > Role.VIEWER and not read)

    def answered(
        self, caller: Caller, grpc_path: str, parameters: Mapping[str, Any], result: str, message: str = ""
    ) -> None:
        """A call answered (OK or an error); recorded if its RPC changes something."""
        operation = grpc_path.rpartition("/")[2]
        if result in REFUSALS:
            self.refused(caller, grpc_path, result, message)
            return
        if not self.audited(grpc_path):
            return
        redacted = redact(parameters)
        self._trail.record(
            AuditRecord(
                time=self._clock.now(),
                actor=caller.identity,
                peer=caller.peer,
                entry_point=caller.entry_point,
                operation=operation,
                target=target_of(redacted)[:MAX_TARGET],
                parameters=bounded(redacted),
                result=result,
                message=message[:MAX_MESSAGE],
            )
        )

    def refused(self, caller: Caller, grpc_path: str, result: str, message: str) -> None:
        self.refused_request(caller, grpc_path.rpartition("/")[2], result, message)

    def refused_request(self, caller: Caller, operation: str, result: str, message: str) -> None:
        """A refusal of something that is not (yet) an RPC: an HTTP request refused before it
        is routed ("POST /api/v1/agents/a1:stop")."""
        self._trail.refused(
            caller.identity, caller.peer, caller.entry_point, operation[:64], result, message[:MAX_MESSAGE]
        )


def parameters_of(request: object) -> dict[str, Any]:
    """A request message's fields as JSON values (proto field names); {} for anything else.
    Never raises: a request the JSON mapping cannot write (a Duration out of its range, which
    the call itself refuses) is recorded as {"unreadable": why}."""
    if not isinstance(request, Message):
        return {}
    try:
        return json_format.MessageToDict(request, preserving_proto_field_name=True)
    except (json_format.Error, ValueError, TypeError, RecursionError) as exc:
        return {"unreadable": str(exc)[:200]}


def redact(value: Any, key: str = "") -> Any:
    """value with every secret replaced by REDACTED (see _SECRET_NAME and _SECRET_MAPS)."""
    if key and _SECRET_NAME.search(key) and key not in ("token_id",):
        return REDACTED
    if isinstance(value, Mapping):
        if key in _SECRET_MAPS:
            return {str(k): REDACTED for k in value}
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item, key) for item in value]
    return value


def target_of(parameters: Mapping[str, Any]) -> str:
    """What a request acts on: its agent or token, or a bulk request's selection."""
    for key in ("agent_id", "token_id"):
        if isinstance(parameters.get(key), str) and parameters[key]:
            return str(parameters[key])
    spec = parameters.get("spec")
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str) and spec["name"]:
        return str(spec["name"])  # a registration without an id: its id comes from the name
    if parameters.get("all") is True:
        return "all"
    if isinstance(parameters.get("label_selector"), str) and parameters["label_selector"]:
        return f"label_selector={parameters['label_selector']}"
    ids = parameters.get("agent_ids")
    if isinstance(ids, list) and ids:
        return ",".join(str(i) for i in ids)
    return ""


def bounded(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters if their JSON fits the record's bound, else as many top-level fields as
    fit, marked truncated."""
    if len(json.dumps(parameters, default=str)) <= MAX_PARAMETERS_BYTES:
        return parameters
    kept: dict[str, Any] = {"truncated": True}
    for key, value in parameters.items():
        trial = {**kept, key: value}
        if len(json.dumps(trial, default=str)) > MAX_PARAMETERS_BYTES:
            continue
        kept = trial
    return kept
