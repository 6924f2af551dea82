"""Test helpers: run an agent in-process on an in-memory bus, with no NATS.

Example (pytest with pytest-asyncio):

    from opmas_agent.testing import AgentHarness

    async def test_ping() -> None:
        async with AgentHarness(MyAgent, env={"MY_THRESHOLD": "3"}) as harness:
            reply = await harness.command("ping")
            assert reply["result"] == "pong"
            await harness.deliver("logs.rtr-1", {"device": "rtr-1", "event": "auth_failure"})
            assert harness.published_on("findings.>") == [...]

The harness calls the agent's `setup` on entry and `teardown` on exit exactly as `run` does,
but sends heartbeats only when asked (`await harness.heartbeat()`) and starts the agent's `run`
loop only with `run_loop=True`, so tests decide when time passes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._agent import Agent
from ._commands import encode
from ._context import AgentContext
from ._time import timestamp
from ._transport import Message, MessageHandler, subject_matches

__all__ = ["AgentHarness", "MemoryTransport", "NoResponders"]

A = TypeVar("A", bound=Agent)
Payload = Mapping[str, Any] | bytes | str


class NoResponders(LookupError):
    """A request matched no subscription (NATS answers "no responders")."""


class MemoryTransport:
    """An in-process Transport: records what is published, delivers what a test sends.

    An agent's own publications are recorded but not delivered back to subscribers: delivery
    happens only through `deliver` and `request`, which await the handlers, so a test sees
    every consequence of a message as soon as the call returns.
    """

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.subscriptions: list[tuple[str, MessageHandler, str]] = []
        self._connected = False
        self._replies: dict[str, bytes] = {}
        self._inbox = 0

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self, on_connected: Callable[[], None]) -> None:
        self._connected = True
        on_connected()

    async def publish(self, subject: str, data: bytes) -> bool:
        if subject.startswith("_INBOX."):
            self._replies[subject] = data
        else:
            self.published.append((subject, data))
        return True

    async def subscribe(self, subject: str, handler: MessageHandler, queue: str = "") -> None:
        self.subscriptions.append((subject, handler, queue))

    async def stop_receiving(self, timeout: float) -> None:
        self.subscriptions.clear()

    async def close(self, timeout: float) -> None:
        self._connected = False

    async def deliver(self, subject: str, data: bytes, reply: str = "") -> int:
        """Hand one message to every matching subscription in turn; how many matched."""
        matched = [
            handler for pattern, handler, _ in list(self.subscriptions) if subject_matches(pattern, subject)
        ]
        for handler in matched:
            await handler(Message(subject=subject, data=data, reply=reply))
        return len(matched)

    async def request(self, subject: str, data: bytes) -> bytes:
        """Deliver with a reply inbox and return the reply; NoResponders when nothing answered."""
        self._inbox += 1
        inbox = f"_INBOX.memory.{self._inbox}"
        await self.deliver(subject, data, reply=inbox)
        try:
            return self._replies.pop(inbox)
        except KeyError:
            raise NoResponders(f"no reply to a request on {subject!r}") from None


def _encode(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return encode(payload)


class AgentHarness(Generic[A]):
    """Runs one agent on a MemoryTransport.

    Args:
        agent_cls: the Agent subclass under test.
        env: its environment (AGENT_ID defaults to the class's `default_id`); the process
            environment is not read, so tests do not depend on the machine.
        run_loop: also run the agent's `run` coroutine in the background.
    """

    def __init__(
        self, agent_cls: type[A], env: Mapping[str, str] | None = None, *, run_loop: bool = False
    ) -> None:
        self.context = AgentContext.from_env(dict(env or {}), default_id=agent_cls.default_id)
        self.transport = MemoryTransport()
        self.agent: A = agent_cls(self.context, self.transport)
        self._run_loop = run_loop
        self._runner: asyncio.Task[None] | None = None
        self.exit_code: int | None = None

    async def __aenter__(self) -> AgentHarness[A]:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.exit_code is None:
            await self.stop()

    async def start(self) -> None:
        """Connect the agent to the memory bus and run its `setup`."""
        await self.agent._start()
        if self._run_loop:
            self._runner = asyncio.create_task(self.agent._run_guarded(), name="harness-run")

    async def stop(self) -> int:
        """Stop the agent as SIGTERM would (teardown included); returns its exit code."""
        self.agent.request_stop("harness stop")
        if self._runner is not None:
            done, _ = await asyncio.wait({self._runner}, timeout=1.0)
            if not done:
                self._runner.cancel()
                await asyncio.gather(self._runner, return_exceptions=True)
        self.exit_code = await self.agent._shutdown()
        return self.exit_code

    # -- talking to the agent ----------------------------------------------------------------

    async def command(
        self, name: str, params: Mapping[str, Any] | None = None, *, kind: str = "command"
    ) -> dict[str, Any]:
        """Send a command as the manager does (`kind` "command" or "query"); returns the reply."""
        request = {
            "command": name,
            "agent_id": self.agent.agent_id,
            "params": dict(params or {}),
            "timestamp": timestamp(),
        }
        return await self.request(self.context.subject(kind), request)

    async def request(self, subject: str, payload: Payload) -> dict[str, Any]:
        """Request/reply with any payload (bytes and str are sent as they are, for bad input)."""
        reply: dict[str, Any] = json.loads(await self.transport.request(subject, _encode(payload)))
        return reply

    async def deliver(self, subject: str, payload: Payload) -> int:
        """Publish a message to the agent's subscriptions; how many subscriptions took it."""
        return await self.transport.deliver(subject, _encode(payload))

    async def heartbeat(self) -> None:
        """Have the agent publish its heartbeat and metrics now."""
        await self.agent.send_heartbeat()

    # -- what the agent published -----------------------------------------------------------

    @property
    def published(self) -> list[tuple[str, dict[str, Any]]]:
        """Everything the agent published, in order, as (subject, decoded JSON)."""
        return [(subject, json.loads(data)) for subject, data in self.transport.published]

    def published_on(self, pattern: str) -> list[dict[str, Any]]:
        """The payloads published on subjects matching `pattern` (wildcards allowed)."""
        return [payload for subject, payload in self.published if subject_matches(pattern, subject)]

    def clear(self) -> None:
        """Forget what was published so far."""
        self.transport.published.clear()
