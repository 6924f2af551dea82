"""Serialized Agent messages, rebuilt only when their record changed.

ListAgents of a thousand agents would otherwise spend ~20 ms building a thousand messages on
every call, though agents rarely change between two calls. Each record's message is kept as
bytes, keyed by the record's last change (updated_at) and last heartbeat (the one field that
changes without a save); a page is the concatenation of those bytes, parsed once in C.

Uptime changes with every call, so it is not in the cached bytes: each agent's bytes are
followed by a second, tiny Agent encoding that sets only status.uptime. Protobuf merges
repeated occurrences of an embedded message field when parsing, so the result is exactly the
message convert.agent_to_pb would have built.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from opmas.v1 import agents_pb2 as pb
from opmasd.api import convert
from opmasd.api.auth import HIDDEN
from opmasd.core.clock import SYSTEM_CLOCK
from opmasd.core.model import AgentRecord

# ListAgentsResponse.agents is field 1, length-delimited: tag byte (1 << 3) | 2.
_AGENTS_TAG = b"\x0a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class AgentWireCache:
    def __init__(self) -> None:
        # By agent id and whether the environment's values are hidden (api.auth.sees_secrets).
        self._entries: dict[tuple[str, bool], tuple[tuple[datetime, datetime | None], bytes]] = {}

    def agent_bytes(self, rec: AgentRecord, monotonic_now: float, hidden: bool = False) -> bytes:
        key = (rec.updated_at, rec.last_heartbeat)
        entry = self._entries.get((rec.agent_id, hidden))
        if entry is None or entry[0] != key:
            message = convert.agent_to_pb(rec)
            message.status.ClearField("uptime")
            if hidden:
                hide_environment(message)
            entry = (key, message.SerializeToString())
            self._entries[(rec.agent_id, hidden)] = entry
        data = entry[1]
        uptime = rec.uptime(monotonic_now)
        if uptime is not None:
            data += pb.Agent(status=pb.AgentStatus(uptime=convert.duration(uptime))).SerializeToString()
        return data

    def list_page(
        self, records: Sequence[AgentRecord], max_bytes: int, hidden: bool = False
    ) -> tuple[pb.ListAgentsResponse, int]:
        """A response with the first records that fit in max_bytes (at least one), and how many
        those are: the caller pages on from there. hidden: environment values hidden."""
        now = SYSTEM_CLOCK.monotonic()
        parts: list[bytes] = []
        size = 0
        taken = 0
        for rec in records:
            data = self.agent_bytes(rec, now, hidden)
            entry = (_AGENTS_TAG, _varint(len(data)), data)
            entry_size = sum(len(part) for part in entry)
            if taken and size + entry_size > max_bytes:
                break
            parts += entry
            size += entry_size
            taken += 1
        return pb.ListAgentsResponse.FromString(b"".join(parts)), taken

    def __len__(self) -> int:
        """Agents cached (each may have two entries: its full and its hidden view)."""
        return len({agent_id for agent_id, _ in self._entries})

    def forget_missing(self, live_ids: set[str]) -> None:
        """Drop entries of agents that are gone (deleted), so the cache does not grow for ever."""
        for key in [key for key in self._entries if key[0] not in live_ids]:
            del self._entries[key]


def hide_environment(message: pb.Agent) -> pb.Agent:
    """The agent with its spec's environment values replaced (the names stay: a viewer may
    know that DB_PASSWORD is set, not what it is)."""
    for name in list(message.spec.environment):
        message.spec.environment[name] = HIDDEN
    return message
