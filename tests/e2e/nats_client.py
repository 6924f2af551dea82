"""A plain nats-py client for the synchronous e2e tests (see NatsClient)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from nats.aio.client import Client as NatsConnection

T = TypeVar("T")

# The subjects of the manager's API (after the installation's prefix): they take an API token.
MANAGER_SUBJECTS = (".manager.command", ".manager.query")


class NatsClient:
    """A plain nats-py client for synchronous tests: its own event loop on a thread of its own,
    so messages keep arriving while a test polls with wait_for.

    It reconnects forever (an outage test stops and restarts the server under it). Payloads
    that are dicts go out as JSON; replies and collected messages come back decoded when they
    are JSON, as bytes when not.

    token: what gives the API token that requests and publishes to the manager subjects
    (`<prefix>.manager.command` / `.query`) present as their "Authorization" header, asked for
    on the first such message (None: they go without credentials, as does any message sent
    with anonymous=True).
    """

    def __init__(self, url: str, name: str = "e2e-test", token: Callable[[], str] | None = None) -> None:
        self.url = url
        self._token_source = token
        self._token = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats:{url}", daemon=True)
        self._thread.start()
        self._nc = NatsConnection()
        try:
            self._run(
                self._nc.connect(
                    url,
                    name=name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2,  # type: ignore[arg-type]  # nats-py says int, takes float
                )
            )
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    def _encode(payload: bytes | dict[str, Any] | str) -> bytes:
        if isinstance(payload, bytes):
            return payload
        if isinstance(payload, str):
            return payload.encode()
        return json.dumps(payload).encode()

    @staticmethod
    def decode(data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            return data

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    def headers(self, subject: str, anonymous: bool = False) -> dict[str, str] | None:
        """The headers a message on subject carries: Authorization to the manager subjects."""
        if anonymous or self._token_source is None or not subject.endswith(MANAGER_SUBJECTS):
            return None
        if not self._token:
            self._token = self._token_source()
        return {"Authorization": f"Bearer {self._token}"}

    def request(
        self,
        subject: str,
        payload: bytes | dict[str, Any] | str,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        anonymous: bool = False,
    ) -> Any:
        """One request; the reply decoded. nats.errors.TimeoutError / NoRespondersError on none.
        headers: sent instead of the client's own (see headers())."""
        sent = headers if headers is not None else self.headers(subject, anonymous)
        msg = self._run(
            self._nc.request(subject, self._encode(payload), timeout=timeout, headers=sent), timeout + 5
        )
        return self.decode(msg.data)

    def publish(
        self, subject: str, payload: bytes | dict[str, Any] | str, reply: str = "", anonymous: bool = False
    ) -> None:
        headers = self.headers(subject, anonymous)
        self._run(self._nc.publish(subject, self._encode(payload), reply=reply, headers=headers))

    def publish_many(self, messages: Sequence[tuple[str, bytes, str]]) -> None:
        """(subject, payload, reply) messages as fast as the client writes them, then a flush."""
        headers = {subject: self.headers(subject) for subject, _, _ in messages}

        async def send() -> None:
            for subject, payload, reply in messages:
                await self._nc.publish(subject, payload, reply=reply, headers=headers[subject])
            await self._nc.flush(10)

        self._run(send(), 60)

    def flush(self) -> None:
        self._run(self._nc.flush(5))

    def new_inbox(self) -> str:
        return str(self._nc.new_inbox())

    def subscribe(self, subject: str) -> list[tuple[str, Any]]:
        """Collect (subject, decoded payload) of every message on subject from now on."""
        received: list[tuple[str, Any]] = []

        async def on_msg(msg: Any) -> None:
            received.append((msg.subject, self.decode(msg.data)))

        async def sub() -> None:
            await self._nc.subscribe(
                subject, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=256 * 1024 * 1024
            )
            await self._nc.flush(5)

        self._run(sub())
        return received

    def close(self) -> None:
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._run(self._nc.close(), 5)
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
