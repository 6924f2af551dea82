"""The intake: agent.status and agent.metrics, decoded strictly and handed to the manager's handlers.

Nothing an agent sends can hurt the daemon: a bad message is counted per subject and logged
once per burst (the bus's malformed BurstLog); a handler that raises is counted and logged,
never raised into nats-py's reader.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from opmasd.bus import codec
from opmasd.bus.base import HeartbeatHandler, MetricsHandler
from opmasd.bus.burst import BurstLog
from opmasd.bus.registration import Registration, Teardown
from opmasd.bus.subjects import Subjects
from opmasd.core.messages import Heartbeat, MetricsReport

# The intake subscriptions get far more room than nats-py's defaults before it drops messages
# as a slow consumer: a fleet's heartbeats arrive in bursts (FIELD-NOTES: raise pending limits).
INTAKE_PENDING_MSGS = 1_000_000
INTAKE_PENDING_BYTES = 512 * 1024 * 1024


class Intake:
    def __init__(self, subjects: Subjects, malformed: BurstLog) -> None:
        self._subjects = subjects
        self._malformed = malformed
        self._heartbeat: HeartbeatHandler | None = None
        self._metrics: MetricsHandler | None = None
        self.messages_in: Counter[str] = Counter()
        self.handler_errors = 0
        self._handler_failures = BurstLog("bus message handler failed", level="error")

    def set_handlers(self, heartbeat: HeartbeatHandler, metrics: MetricsHandler) -> None:
        self._heartbeat = heartbeat
        self._metrics = metrics

    def registrations(self, on_stop: Callable[[Registration], None]) -> list[Registration]:
        """The two subscriptions, for the connection to set up (and replay after reconnects)."""
        return [
            self._subscription(self._subjects.status, self._on_status, on_stop),
            self._subscription(self._subjects.metrics, self._on_metrics, on_stop),
        ]

    def close(self) -> None:
        """Write the pending handler-failure summaries."""
        self._handler_failures.close()

    def _subscription(
        self,
        subject: str,
        callback: Callable[[Msg], Awaitable[None]],
        on_stop: Callable[[Registration], None],
    ) -> Registration:
        async def setup(nc: Client) -> Teardown:
            sub = await nc.subscribe(
                subject,
                cb=callback,
                pending_msgs_limit=INTAKE_PENDING_MSGS,
                pending_bytes_limit=INTAKE_PENDING_BYTES,
            )
            return sub.unsubscribe

        return Registration(f"intake {subject}", setup, on_stop=on_stop)

    async def _on_status(self, msg: Msg) -> None:
        self._take(msg, codec.decode_heartbeat, self._heartbeat)

    async def _on_metrics(self, msg: Msg) -> None:
        self._take(msg, codec.decode_metrics, self._metrics)

    def _take(
        self,
        msg: Msg,
        decode: Callable[[bytes], Heartbeat | MetricsReport],
        handler: Callable[[Any], None] | None,
    ) -> None:
        self.messages_in[msg.subject] += 1
        try:
            value = decode(msg.data)
        except codec.MalformedMessage as exc:
            self._malformed.record(msg.subject, exc.reason, size=len(msg.data))
            return
        self._deliver(msg.subject, handler, value)

    def _deliver(
        self,
        subject: str,
        handler: Callable[[Any], None] | None,
        value: Heartbeat | MetricsReport,
    ) -> None:
        if handler is None:
            return  # nobody asked yet (startup): the next heartbeat comes soon enough
        try:
            handler(value)
        except Exception as exc:
            self.handler_errors += 1
            self._handler_failures.record(
                subject, f"{type(exc).__name__}: {exc}", agent_id=value.agent_id, exc_info=exc
            )
