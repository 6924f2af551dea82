"""The NATS subjects of DESIGN §5, under a configurable prefix (several installations, one NATS).

Each agent publishes its heartbeats and metrics on subjects of its own ({p}.{id}.status,
{p}.{id}.metrics), so that a server can tell agents apart by subject (the embedded one gives each
agent a login allowed only its own); the shared {p}.status / {p}.metrics of the original design
are still taken from agents that use them. Replies to opmasd's requests go to inboxes under
MANAGER_INBOX that name the agent asked, and an agent's own requests use inboxes under
`_INBOX.{id}` (agent_inbox): an agent may be allowed to reply to its own requests only and to
read its own replies only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from opmasd.core.ids import is_valid_agent_id

# The prefix: dot-separated tokens of letters, digits, '-' and '_' (no wildcards, no whitespace,
# which nats-server would read as separators or widen into patterns).
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
# Where opmasd's requests to agents get their replies: MANAGER_INBOX.{connection}.{agent id}.{token}.
# "manager" is a reserved agent id, so no agent's own inbox (_INBOX.{id}) is this one.
MANAGER_INBOX = "_INBOX.manager"


def is_valid_prefix(prefix: str) -> bool:
    return bool(PREFIX_PATTERN.match(prefix))


@dataclass(frozen=True)
class Subjects:
    prefix: str = "agent"

    def __post_init__(self) -> None:
        if not is_valid_prefix(self.prefix):
            raise ValueError(
                f"subject prefix {self.prefix!r} must be tokens of letters, digits, '-' and '_' "
                "separated by dots"
            )

    @property
    def manager_command(self) -> str:
        return f"{self.prefix}.manager.command"

    @property
    def manager_query(self) -> str:
        return f"{self.prefix}.manager.query"

    @property
    def manager_response(self) -> str:
        return f"{self.prefix}.manager.response"

    @property
    def status(self) -> str:
        """Heartbeats, agent → manager, on the shared subject of the original design."""
        return f"{self.prefix}.status"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}.metrics"

    @property
    def agents_status(self) -> str:
        """Every agent's own heartbeat subject ({p}.{id}.status), as one subscription."""
        return f"{self.prefix}.*.status"

    @property
    def agents_metrics(self) -> str:
        return f"{self.prefix}.*.metrics"

    def agent_status(self, agent_id: str) -> str:
        return self._agent(agent_id, "status")

    def agent_metrics(self, agent_id: str) -> str:
        return self._agent(agent_id, "metrics")

    def agent_command(self, agent_id: str) -> str:
        return self._agent(agent_id, "command")

    def agent_query(self, agent_id: str) -> str:
        return self._agent(agent_id, "query")

    def agent_response(self, agent_id: str) -> str:
        return self._agent(agent_id, "response")

    def agent_inbox(self, agent_id: str) -> str:
        """The inbox prefix of the agent's own requests (its replies arrive under it)."""
        return f"_INBOX.{_token(agent_id)}"

    def agent_replies(self, agent_id: str) -> str:
        """The replies the agent may send to opmasd's requests: those addressed to it."""
        return f"{MANAGER_INBOX}.*.{_token(agent_id)}.*"

    def _agent(self, agent_id: str, kind: str) -> str:
        return f"{self.prefix}.{_token(agent_id)}.{kind}"


def _token(agent_id: str) -> str:
    # One token, never a reserved one (core.ids): agent "manager" would collide with
    # {p}.manager.command, and an id holding a dot would widen into another agent's subject.
    if not is_valid_agent_id(agent_id):
        raise ValueError(f"agent id {agent_id[:80]!r} cannot be part of a NATS subject")
    return agent_id
