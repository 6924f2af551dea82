"""The records the api makes for the audit trail: only what changes something, every refusal,
secrets redacted, bounded."""

from __future__ import annotations

import json
from typing import Any

from opmas.v1 import agents_pb2 as pb
from opmasd.api.audit_records import REDACTED, Auditor, bounded, parameters_of, redact, target_of
from opmasd.api.auth import declared_roles
from opmasd.core.audit import MAX_PARAMETERS_BYTES, AuditRecord
from opmasd.core.auth import Caller, Role


class Trail:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.refusals: list[tuple[str, ...]] = []

    def record(self, rec: AuditRecord) -> None:
        self.records.append(rec)

    def refused(
        self, actor: str, peer: str, entry_point: str, operation: str, result: str, message: str
    ) -> None:
        self.refusals.append((actor, peer, entry_point, operation, result))


CALLER = Caller("token:0123456789abcdef", Role.ADMIN, "ipv4:10.1.2.3:4567", "rest")


def test_only_calls_that_change_something_are_recorded() -> None:
    trail = Trail()
    auditor = Auditor(trail, declared_roles())
    auditor.answered(CALLER, "/opmas.v1.AgentService/ListAgents", {}, "OK")
    auditor.answered(CALLER, "/opmas.v1.TokenService/ListTokens", {}, "OK")  # an admin's read
    auditor.answered(CALLER, "/opmas.v1.AuditService/ListAuditRecords", {}, "OK")
    auditor.answered(CALLER, "/opmas.v1.AgentService/StopAgent", {"agent_id": "a1"}, "OK")
    auditor.answered(
        CALLER, "/opmas.v1.AgentService/DeleteAgent", {"agent_id": "a2"}, "NOT_FOUND", "agent 'a2'"
    )
    assert [(r.operation, r.target, r.result, r.actor, r.peer, r.entry_point) for r in trail.records] == [
        ("StopAgent", "a1", "OK", CALLER.identity, CALLER.peer, "rest"),
        ("DeleteAgent", "a2", "NOT_FOUND", CALLER.identity, CALLER.peer, "rest"),
    ]


def test_refusals_of_any_rpc_go_to_the_trail_as_refusals() -> None:
    trail = Trail()
    auditor = Auditor(trail, declared_roles())
    anonymous = Caller("anonymous", None, "ipv4:10.1.2.3:4567", "grpc")
    auditor.refused(anonymous, "/opmas.v1.AgentService/ListAgents", "UNAUTHENTICATED", "no token")
    auditor.answered(CALLER, "/opmas.v1.AgentService/StopAgent", {}, "PERMISSION_DENIED", "role")
    assert [r[3:] for r in trail.refusals] == [
        ("ListAgents", "UNAUTHENTICATED"),
        ("StopAgent", "PERMISSION_DENIED"),
    ]
    assert trail.records == []


def test_secrets_are_redacted_wherever_they_are() -> None:
    request = pb.CreateAgentRequest(
        agent_id="web",
        spec=pb.AgentSpec(
            name="web", command=["run"], environment={"DB_URL": "postgres://u:pw@h/db", "MODE": "x"}
        ),
    )
    params = redact(parameters_of(request))
    assert params["spec"]["environment"] == {"DB_URL": REDACTED, "MODE": REDACTED}
    assert params["spec"]["command"] == ["run"] and params["agent_id"] == "web"
    nested: dict[str, Any] = {"params": {"password": "p", "api_key": "k", "list": [{"secret": "s", "n": 1}]}}
    assert redact(nested) == {
        "params": {"password": REDACTED, "api_key": REDACTED, "list": [{"secret": REDACTED, "n": 1}]}
    }
    assert redact({"token_id": "0123456789abcdef"}) == {"token_id": "0123456789abcdef"}  # an id, not a secret


def test_the_target_of_single_and_bulk_requests() -> None:
    assert target_of({"agent_id": "a1"}) == "a1"
    assert target_of({"token_id": "0123456789abcdef"}) == "0123456789abcdef"
    assert target_of({"all": True}) == "all"
    assert target_of({"label_selector": "env=prod"}) == "label_selector=env=prod"
    assert target_of({"agent_ids": ["a", "b"]}) == "a,b"
    assert target_of({"spec": {"name": "web"}}) == "web"
    assert target_of({}) == ""


def test_parameters_are_bounded_and_stay_valid_json() -> None:
    big = {"small": 1, "huge": "x" * (2 * MAX_PARAMETERS_BYTES), "also": "y"}
    kept = bounded(big)
    assert kept == {"truncated": True, "small": 1, "also": "y"}
    assert len(json.dumps(kept)) <= MAX_PARAMETERS_BYTES
    assert bounded({"a": 1}) == {"a": 1}


def test_a_request_the_json_mapping_cannot_write_is_recorded_as_unreadable() -> None:
    request = pb.CreateAgentRequest(spec=pb.AgentSpec(name="x"))
    request.spec.stop_timeout.seconds = 2**63 - 1  # the call refuses it; the record must not fail
    assert "Duration is not valid" in parameters_of(request)["unreadable"]
