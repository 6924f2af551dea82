"""Running request handlers concurrently, each in a task with an owner.

nats-py calls a subscription's callback for one message at a time, so a handler that waits
(stopping an agent takes up to its stop_timeout) would hold every later request on that
subject. The runner gives each request its own task, bounded by max_in_flight: past that the
subscription callback waits, and NATS buffers (backpressure rather than unbounded tasks).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog

from opmasd.bus.burst import BurstLog
from opmasd.core.tasks import TaskOwner

log = structlog.get_logger(__name__)

RequestHandler = Callable[[bytes], Awaitable[bytes | None]]
"""Takes a request payload; returns the reply payload, or None for no reply."""

ReplyFn = Callable[[bytes], Awaitable[None]]

DEFAULT_MAX_IN_FLIGHT = 64


class RequestRunner:
    def __init__(self, name: str, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self._name = name
        self._tasks = TaskOwner(f"requests:{name}")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.handled: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._failures = BurstLog("request handler failed", level="error")
        self._reply_failures = BurstLog("reply not sent")

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def dispatch(
        self, subject: str, data: bytes, handler: RequestHandler, reply: ReplyFn | None
    ) -> None:
        """Start handling one request; returns once it has a task (or was refused)."""
        if self._closed:
            log.debug("request after stop ignored", service=self._name, subject=subject)
            return
        await self._slots.acquire()
        self._in_flight += 1
        self._idle.clear()
        try:
            self._tasks.spawn(self._run(subject, data, handler, reply), subject)
        except RuntimeError:
            self._done()
            log.debug("request after stop ignored", service=self._name, subject=subject)

    async def _run(self, subject: str, data: bytes, handler: RequestHandler, reply: ReplyFn | None) -> None:
        try:
            try:
                response = await handler(data)
            except Exception as exc:
                # A handler is meant to turn every problem into an error reply; reaching
                # this is a bug in it. The requester times out; we keep serving.
                self.failed[subject] += 1
                self._failures.record(subject, f"{type(exc).__name__}: {exc}", exc_info=exc)
                return
            self.handled[subject] += 1
            if response is None or reply is None:
                return
            try:
                await reply(response)
            except Exception as exc:
                # Disconnected in between, or the reply is larger than the server accepts.
                self._reply_failures.record(subject, f"{type(exc).__name__}: {exc}")
        finally:
            self._done()

    def _done(self) -> None:
        self._slots.release()
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def close(self, grace: float) -> None:
        """Refuse new requests, give running ones up to grace seconds, cancel the rest."""
        self._closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "requests still running at stop; cancelling", service=self._name, count=self._in_flight
            )
        await self._tasks.close()
        self._failures.close()
        self._reply_failures.close()
