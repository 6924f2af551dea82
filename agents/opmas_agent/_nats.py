"""The real transport: nats-py, connecting in the background and reconnecting forever.

nats-py's client is one large untyped class (STYLE: depend on it, do not imitate it); this
module is the only place the SDK touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._context import redact_url
from ._throttle import Throttle
from ._transport import Message, MessageHandler

# Data subjects (device logs) can be busy: a deep per-subscription queue rides out bursts
# while the handler catches up, instead of nats-py dropping messages as a slow consumer.
PENDING_MSGS_LIMIT = 256 * 1024
PENDING_BYTES_LIMIT = 256 * 1024 * 1024


class NatsTransport:
    """Transport on nats-py. Args: url and credentials, connection name, a structlog logger."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        log: Any,
        user: str = "",
        password: str = "",
        inbox_prefix: str = "",
        reconnect_wait: float = 1.0,
    ) -> None:
        self._url = url
        self._name = name
        self._user = user
        self._password = password
        self._inbox_prefix = inbox_prefix
        self._reconnect_wait = reconnect_wait
        self._log = log.bind(nats_url=redact_url(url))
        self._nc = NATS()
        self._subs: list[tuple[str, MessageHandler, str]] = []
        self._live: list[Subscription] = []
        self._ready = False  # connected once and subscriptions made
        self._closing = False
        self._began = False
        self._connect_task: asyncio.Task[None] | None = None
        self._on_connected: Callable[[], None] = lambda: None
        self._throttle = Throttle(30.0)

    @property
    def connected(self) -> bool:
        return self._ready and self._nc.is_connected

    async def start(self, on_connected: Callable[[], None]) -> None:
        self._on_connected = on_connected
        # Owned by this transport and cancelled or awaited in close(): the agent runs (and
        # answers SIGTERM) while NATS is still unreachable.
        self._connect_task = asyncio.create_task(self._connect(), name="nats-connect")
        self._connect_task.add_done_callback(self._connect_done)

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        # Connecting retries forever, so an exception here is a bug or an unusable setting:
        # say so at once rather than when the agent stops.
        if not task.cancelled() and task.exception() is not None:
            self._log.error("nats connection abandoned", error=repr(task.exception()))

    async def _connect(self) -> None:
        # nats-py's connect sets up its internals before its first await: from here on the
        # client can be closed, before this point it must not be touched.
        self._began = True
        options: dict[str, Any] = {}
        if self._user:
            options.update(user=self._user, password=self._password)
        if self._inbox_prefix:  # replies to its own requests: the only inboxes its login may read
            options.update(inbox_prefix=self._inbox_prefix)
        await self._nc.connect(
            servers=[u.strip() for u in self._url.split(",") if u.strip()],
            name=self._name,
            # -1: never give up, neither on the first connect nor after an outage.
            max_reconnect_attempts=-1,
            reconnect_time_wait=self._reconnect_wait,  # type: ignore[arg-type]  # nats-py says int, takes float
            connect_timeout=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            **options,
        )
        # Subscriptions asked for before the connection existed; indexing (not iterating) picks
        # up any added while we await here.
        i = 0
        while i < len(self._subs):
            await self._nats_subscribe(*self._subs[i])
            i += 1
        self._ready = True
        self._log.info("nats connected", server=self._server())
        self._on_connected()

    def _server(self) -> str:
        url = self._nc.connected_url
        return redact_url(url.geturl()) if url is not None else ""

    async def _nats_subscribe(self, subject: str, handler: MessageHandler, queue: str) -> None:
        async def deliver(msg: Msg) -> None:
            await handler(Message(subject=msg.subject, data=msg.data, reply=msg.reply or ""))

        sub = await self._nc.subscribe(
            subject,
            queue=queue,
            cb=deliver,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT,
        )
        self._live.append(sub)

    async def _on_error(self, exc: Exception) -> None:
        # Called for every failed (re)connect attempt too: throttled per error type.
        if isinstance(exc, nats.errors.SlowConsumerError):
            key = "slow-consumer"
        else:
            key = type(exc).__name__
        self._warn(key, "nats error", error=repr(exc))

    def _warn(self, key: str, event: str, **fields: Any) -> None:
        suppressed = self._throttle.allow(key)
        if suppressed:
            fields["suppressed"] = suppressed  # lines of this kind held back since the last one
        if suppressed is not None:
            self._log.warning(event, **fields)

    async def _on_disconnected(self) -> None:
        if self._ready and not self._closing:
            self._log.warning("nats disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        self._log.info("nats reconnected", server=self._server())
        self._on_connected()

    async def _on_closed(self) -> None:
        self._log.info("nats connection closed")

    async def publish(self, subject: str, data: bytes) -> bool:
        if not self._ready:
            # Nothing reaches the server before the first connect; heartbeats are periodic and
            # the first one goes out on connect, so dropping is the honest choice.
            self._log.debug("not connected yet: message dropped", subject=subject)
            return False
        try:
            # While reconnecting nats-py buffers (up to its pending size) and sends on reconnect.
            await self._nc.publish(subject, data)
        except nats.errors.Error as exc:
            suppressed = self._throttle.allow("publish")
            if suppressed is not None:
                self._log.warning(
                    "publish failed", subject=subject, error=repr(exc), suppressed=suppressed or None
                )
            return False
        return True

    async def subscribe(self, subject: str, handler: MessageHandler, queue: str = "") -> None:
        self._subs.append((subject, handler, queue))
        if self._ready:
            await self._nats_subscribe(subject, handler, queue)

    async def stop_receiving(self, timeout: float) -> None:
        subs, self._live = self._live, []
        if not subs or not self.connected:
            return
        try:
            # Unsubscribe, then wait for the handlers to finish what had already arrived.
            drains = (sub.drain() for sub in subs)  # type: ignore[no-untyped-call]
            await asyncio.wait_for(asyncio.gather(*drains), timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            self._log.warning("subscriptions not fully drained", error=repr(exc))

    async def close(self, timeout: float) -> None:
        self._closing = True
        task = self._connect_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._log.info("stopped before NATS was reachable")
            if self._began:
                await self._nc.close()
            return
        if self._nc.is_closed or not self._began:
            return
        if self.connected:  # while reconnecting there is nowhere to flush to: do not wait
            try:
                # Whatever was published (final findings, the last heartbeat) reaches the server.
                await asyncio.wait_for(self._nc.flush(), timeout)
            except (TimeoutError, nats.errors.Error) as exc:
                self._log.warning("could not flush to NATS before closing", error=repr(exc))
        await self._nc.close()
