"""Something served on the bus — a subscription, a micro service — with its own stop().

The bus may be asked to serve before it ever connected; a Registration holds how to set the
thing up (applied on the first connect, or at once) and how to take it down again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats.errors
import structlog
from nats.aio.client import Client

from opmasd.bus.serving import RequestRunner

log = structlog.get_logger(__name__)

REQUEST_GRACE = 5.0
# Unsubscribing waits for a server round trip; with the server gone it must not hold shutdown.
TEARDOWN_TIMEOUT = 2.0

Teardown = Callable[[], Awaitable[None]]
Setup = Callable[[Client], Awaitable[Teardown]]


async def server_has_seen(nc: Client, timeout: int = 5) -> None:
    """Return once the server has processed everything this client sent so far.

    nats-py's flush() (2.16) writes its PING straight to the socket, ahead of commands still
    in its pending buffer (a SUB just made), so its PONG proves nothing about them. During the
    first round trip the flusher task writes that buffer; the second PING queues behind it.
    """
    await nc.flush(timeout)
    await nc.flush(timeout)


class Registration:
    def __init__(
        self,
        what: str,
        setup: Setup,
        runner: RequestRunner | None = None,
        on_stop: Callable[[Registration], None] | None = None,
    ) -> None:
        self.what = what
        self._setup = setup
        self.runner = runner
        self._on_stop = on_stop
        self._nc: Client | None = None
        self._teardown: Teardown | None = None
        self._stopped = False

    async def apply(self, nc: Client) -> None:
        """Set it up on a connected client (nothing, once stopped)."""
        if self._stopped:
            return
        self._nc = nc
        self._teardown = await self._setup(nc)
        # So that a request sent from any connection right after serve() finds its responder.
        await server_has_seen(nc)
        log.debug("bus registration active", what=self.what)

    async def stop(self, grace: float = REQUEST_GRACE) -> None:
        """Stop receiving, let running requests finish (up to grace seconds), then cancel them."""
        if self._stopped:
            return
        self._stopped = True
        if self._on_stop is not None:
            self._on_stop(self)
        nc = self._nc
        if self._teardown is not None and nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(self._teardown(), TEARDOWN_TIMEOUT)
                if nc.is_connected:
                    await asyncio.wait_for(server_has_seen(nc), TEARDOWN_TIMEOUT)
            except (TimeoutError, nats.errors.Error) as exc:
                # Closing the connection (what follows at shutdown) removes it regardless.
                log.warning(
                    "bus registration not removed cleanly",
                    what=self.what,
                    error=str(exc) or type(exc).__name__,
                )
        if self.runner is not None:
            await self.runner.close(grace)
