"""The small interface between an agent and its message bus.

The Agent's logic (commands, heartbeats, JSON codecs) sits above this on plain bytes and
subjects; the real transport (`_nats.NatsTransport`) and the in-memory one of
`opmas_agent.testing` both implement it, so everything above is testable without sockets —
the httpx cut between logic and I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Message:
    """One delivered message. `reply` is the requester's inbox, empty for a plain publish."""

    subject: str
    data: bytes
    reply: str = ""


MessageHandler = Callable[[Message], Awaitable[None]]


class Transport(Protocol):
    """Publish, subscribe, connect and close; all an agent needs from NATS."""

    @property
    def connected(self) -> bool:
        """Whether messages published now would reach the server."""
        ...

    async def start(self, on_connected: Callable[[], None]) -> None:
        """Begin connecting and return without waiting for it.

        `on_connected` runs after each (re)connect, once the subscriptions are in place — the
        Agent uses it to send a heartbeat at once, so the manager learns of it promptly.
        """
        ...

    async def publish(self, subject: str, data: bytes) -> bool:
        """Send one message; False (after logging why) when it could not be sent."""
        ...

    async def subscribe(self, subject: str, handler: MessageHandler, queue: str = "") -> None:
        """Deliver messages on `subject` (wildcards allowed) to `handler`, one at a time.

        Valid before the connection is up: the subscription is made when it is.
        """
        ...

    async def stop_receiving(self, timeout: float) -> None:
        """Unsubscribe everything, and wait for handlers to finish what already arrived."""
        ...

    async def close(self, timeout: float) -> None:
        """Flush what was published, then close. Also ends a connect still in progress."""
        ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a final `>` is one or more tokens."""
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return i == len(want) - 1 and len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
