"""The NATS subjects of DESIGN §5, under a configurable prefix (several installations, one NATS)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# One NATS subject token: no separators, wildcards or whitespace (nats-server would split or
# widen a subject built from anything else).
_TOKEN = re.compile(r"^[^.*>\s]+$")
# First tokens after the prefix that name the manager's own subjects: an agent with one of
# these ids would collide with them (agent "manager" ↔ {p}.manager.command).
RESERVED_AGENT_IDS = frozenset({"manager", "node"})


@dataclass(frozen=True)
class Subjects:
    prefix: str = "agent"

    def __post_init__(self) -> None:
        if not self.prefix or not all(_TOKEN.match(token) for token in self.prefix.split(".")):
            raise ValueError(
                f"subject prefix {self.prefix!r} must be dot-separated tokens without '*', '>' or whitespace"
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
        """Heartbeats: agent → manager."""
        return f"{self.prefix}.status"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}.metrics"

    def agent_command(self, agent_id: str) -> str:
        return self._agent(agent_id, "command")

    def agent_query(self, agent_id: str) -> str:
        return self._agent(agent_id, "query")

    def agent_response(self, agent_id: str) -> str:
        return self._agent(agent_id, "response")

    def _agent(self, agent_id: str, kind: str) -> str:
        # Agent ids may hold dots (the manager allows [a-z0-9_.-]); the subject then has more
        # tokens, which is valid NATS and what an agent subscribing to its own id expects.
        tokens = agent_id.split(".")
        if not all(_TOKEN.match(token) for token in tokens):
            raise ValueError(f"agent id {agent_id[:80]!r} cannot be part of a NATS subject")
        if tokens[0] in RESERVED_AGENT_IDS:
            raise ValueError(f"agent id {agent_id!r} collides with the manager's subjects")
        return f"{self.prefix}.{agent_id}.{kind}"
