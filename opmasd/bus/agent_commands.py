"""Request/reply to one agent: a §5 command on {p}.{id}.command, its reply decoded strictly.

The reply is asked for on an inbox that names the agent (MANAGER_INBOX.{connection}.{id}.{token},
one subscription for all of them), so that a server can let each agent answer opmasd's requests
to it and nothing else. nats-server's allow_responses would instead let an agent publish on any
subject named as the reply of a message it receives, a message it sent itself included, and so
on another agent's command subject.

nats-py's failures become the bus errors of core.errors (BusTimeout, BusUnavailable), so the
manager never sees a NATS exception; a reply that is not a §5 response is counted as malformed
input and comes back as an error reply, not an exception.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from opmasd.bus import codec
from opmasd.bus.burst import BurstLog
from opmasd.bus.registration import Registration, Teardown
from opmasd.bus.subjects import MANAGER_INBOX, Subjects
from opmasd.core.errors import BusRejected, BusTimeout, BusUnavailable
from opmasd.core.messages import ERROR, CommandReply

# The status header nats-server puts on the message it sends a request's reply subject when
# nobody listens on the request's subject.
NO_RESPONDERS = "503"


class AgentCommands:
    def __init__(
        self, nc: Client, subjects: Subjects, malformed: BurstLog, connected: Callable[[], bool]
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._malformed = malformed
        self._connected = connected
        # This bus's replies only, should several opmasd share a server.
        self._inbox = f"{MANAGER_INBOX}.{secrets.token_hex(8)}"
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self.requests_sent = 0

    def registration(self, on_stop: Callable[[Registration], None]) -> Registration:
        """The one subscription every reply arrives on, for the connection to set up."""

        async def setup(nc: Client) -> Teardown:
            sub = await nc.subscribe(f"{self._inbox}.*.*", cb=self._on_reply)
            return sub.unsubscribe

        return Registration("agent replies", setup, on_stop=on_stop)

    async def _on_reply(self, msg: Msg) -> None:
        waiter = self._waiting.pop(msg.subject, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
        # Else a second reply, or one after its request timed out: nobody waits for it.

    async def command_agent(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float
    ) -> CommandReply:
        subject = self._subjects.agent_command(agent_id)
        if not self._connected():
            raise BusUnavailable("not connected to NATS")
        payload = codec.encode_command(command, agent_id, params)
        inbox = f"{self._inbox}.{agent_id}.{secrets.token_hex(8)}"
        waiter: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[inbox] = waiter
        try:
            await self._nc.publish(subject, payload, reply=inbox)
            msg = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
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
            self._waiting.pop(inbox, None)
            self.requests_sent += 1
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            raise BusTimeout(f"agent {agent_id} is not listening on {subject}")
        try:
            return codec.decode_response(msg.data).to_reply()
        except codec.MalformedMessage as exc:
            self._malformed.record(f"reply from {subject}", exc.reason, size=len(msg.data))
            return CommandReply(status=ERROR, error=f"malformed reply: {exc.reason}")
