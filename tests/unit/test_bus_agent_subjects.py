"""Agents' own subjects: the intake takes a heartbeat only for the agent its subject names, the
embedded server's per-agent permissions, and which data patterns an agent may be given."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from opmasd.bus.burst import BurstLog
from opmasd.bus.embedded_users import DataSubjects, agent_permissions
from opmasd.bus.intake import Intake
from opmasd.bus.subject_patterns import check_data_pattern, overlap
from opmasd.bus.subjects import Subjects
from opmasd.core.messages import Heartbeat, MetricsReport


def message(subject: str, body: dict[str, Any]) -> Msg:
    return Msg(_client=None, subject=subject, data=json.dumps(body).encode())  # type: ignore[arg-type]


class Handlers:
    def __init__(self, intake: Intake) -> None:
        self.heartbeats: list[Heartbeat] = []
        self.metrics: list[MetricsReport] = []
        intake.set_handlers(self.heartbeats.append, self.metrics.append)


async def deliver(intake: Intake, subject: str, body: dict[str, Any]) -> None:
    """As the bus's subscriptions would: by the pattern the subject falls under."""
    callbacks = {
        "t.status": intake._on_status,
        "t.metrics": intake._on_metrics,
    }
    if subject in callbacks:
        await callbacks[subject](message(subject, body))
    elif subject.endswith(".status"):
        await intake._on_agent_status(message(subject, body))
    else:
        await intake._on_agent_metrics(message(subject, body))


def test_a_heartbeat_naming_another_agent_than_its_subject_is_dropped_and_counted() -> None:
    malformed = BurstLog("malformed message")
    intake = Intake(Subjects("t"), malformed)
    got = Handlers(intake)

    async def run() -> None:
        await deliver(intake, "t.a.status", {"agent_id": "a", "status": "running"})
        await deliver(intake, "t.a.status", {"agent_id": "b", "status": "running"})
        await deliver(intake, "t.a.metrics", {"agent_id": "b", "metrics": {}})
        await deliver(intake, "t.a.metrics", {"agent_id": "a", "metrics": {"n": 1}})
        # The shared subject of the original design names no agent: taken as it says.
        await deliver(intake, "t.status", {"agent_id": "b", "status": "running"})

    with capture_logs() as logs:
        asyncio.run(run())
    assert [h.agent_id for h in got.heartbeats] == ["a", "b"]
    assert [m.agent_id for m in got.metrics] == ["a"]
    # Counted by subscription (a sender inventing ids cannot grow the counts), logged with why.
    assert malformed.counts() == {"t.*.status": 1, "t.*.metrics": 1}
    assert intake.messages_in == {"t.*.status": 2, "t.*.metrics": 2, "t.status": 1}
    [first, *_] = [e for e in logs if e["event"] == "malformed message"]
    assert "'b' is not the agent of the subject it came on ('a')" in first["reason"]


def test_an_agents_permissions_are_its_own_subjects_and_the_data_ones() -> None:
    perms = agent_permissions(
        Subjects("t"), "a", DataSubjects(publish=("findings.>",), subscribe=("logs.>",))
    )
    assert perms == {
        "publish": {
            "allow": ["t.a.status", "t.a.metrics", "t.a.response", "_INBOX.manager.*.a.*", "findings.>"]
        },
        "subscribe": {"allow": ["t.a.command", "t.a.query", "_INBOX.a.>", "logs.>"]},
    }  # and no allow_responses: see agent_commands
    publish: list[str] = perms["publish"]["allow"]  # type: ignore[index]
    for other in ("b", "manager"):
        theirs = (f"t.{other}.command", f"t.{other}.status", f"_INBOX.{other}.x")
        assert not any(overlap(mine, subject) for mine in publish for subject in theirs)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (">", "could match agent.>"),
        ("agent.>", "could match agent.>"),
        ("*.status", "could match agent.>"),
        ("*.*.command", "could match agent.>"),
        ("_INBOX.>", "could match _INBOX.>"),
        ("_INBOX.a.>", "could match _INBOX.>"),
        ("$SRV.>", "not a NATS subject pattern"),
        ("logs.>.x", "not a NATS subject pattern"),
        ("logs..x", "not a NATS subject pattern"),
        ('logs."x', "not a NATS subject pattern"),
        ("", "not a NATS subject pattern"),
    ],
)
def test_data_patterns_that_reach_beyond_data_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("$", r"\$").replace("*", r"\*")):
        check_data_pattern(pattern, "agent")


@pytest.mark.parametrize("pattern", ["logs.>", "findings.*", "events.x.>", "agent", "*", "agentx.>"])
def test_data_patterns_of_their_own_tree_are_accepted(pattern: str) -> None:
    check_data_pattern(pattern, "agent")


def test_a_dotted_prefix_is_one_tree() -> None:
    check_data_pattern("site1.logs.>", "site1.agent")
    with pytest.raises(ValueError):
        check_data_pattern("site1.>", "site1.agent")
    with pytest.raises(ValueError):
        check_data_pattern("*.agent.>", "site1.agent")
