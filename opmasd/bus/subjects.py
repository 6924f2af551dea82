"""The NATS subjects of DESIGN §5, under a configurable prefix (several installations, one NATS)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from opmasd.core.ids import is_valid_agent_id

# The prefix: dot-separated tokens of letters, digits, '-' and '_' (no wildcards, no whitespace,
# which nats-server would read as separators or widen into patterns).
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


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
        # One token, never a reserved one (core.ids): agent "manager" would collide with
        # {p}.manager.command, and an id holding a dot would widen into another agent's subject.
        if not is_valid_agent_id(agent_id):
            raise ValueError(f"agent id {agent_id[:80]!r} cannot be part of a NATS subject")
        return f"{self.prefix}.{agent_id}.{kind}"
