"""Request/reply to one agent: a §5 command on {p}.{id}.command, its reply decoded strictly.

nats-py's failures become the bus errors of core.errors (BusTimeout, BusUnavailable), so the
manager never sees a NATS exception; a reply that is not a §5 response is counted as malformed
input and comes back as an error reply, not an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client

from opmasd.bus import codec
from opmasd.bus.burst import BurstLog
from opmasd.bus.subjects import Subjects
from opmasd.core.errors import BusRejected, BusTimeout, BusUnavailable
from opmasd.core.messages import ERROR, CommandReply


class AgentCommands:
    def __init__(
        self, nc: Client, subjects: Subjects, malformed: BurstLog, connected: Callable[[], bool]
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._malformed = malformed
        self._connected = connected
        self.requests_sent = 0

    async def command_agent(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float
    ) -> CommandReply:
        subject = self._subjects.agent_command(agent_id)
        if not self._connected():
            raise BusUnavailable("not connected to NATS")
        payload = codec.encode_command(command, agent_id, params)
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError:
            raise BusTimeout(f"agent {agent_id} is not listening on {subject}") from None
        except nats.errors.TimeoutError:
            raise BusTimeout(f"agent {agent_id} did not answer {command!r} within {timeout:g}s") from None
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.ConnectionDrainingError,
            nats.errors.OutboundBufferLimitError,
        ) as exc:
            raise BusUnavailable(f"NATS connection lost: {exc}") from None
        except nats.errors.MaxPayloadError:
            raise BusRejected(
                f"the command is {len(payload)} bytes, more than the NATS server takes"
            ) from None
        finally:
            self.requests_sent += 1
        try:
            return codec.decode_response(msg.data).to_reply()
        except codec.MalformedMessage as exc:
            self._malformed.record(f"reply from {subject}", exc.reason, size=len(msg.data))
            return CommandReply(status=ERROR, error=f"malformed reply: {exc.reason}")
