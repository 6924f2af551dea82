"""The intake: heartbeats and metrics, decoded strictly and handed to the manager's handlers.

They arrive on each agent's own subjects ({p}.{id}.status, {p}.{id}.metrics), where a message
naming another agent than its subject does is refused (with the embedded server, the subject is
what the sender's login allows: the payload is not to be trusted over it), and on the shared
{p}.status / {p}.metrics of the original design, for agents that still use those.

Nothing an agent sends can hurt the daemon: a bad message is counted per subscription and
logged once per burst (the bus's malformed BurstLog); a handler that raises is counted and
logged, never raised into nats-py's reader. Counts are kept by subscription, not by subject:
a sender inventing agent ids must not grow them without bound.
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
        self._head = len(subjects.prefix) + 1
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
        """The subscriptions, for the connection to set up (and replay after reconnects)."""
        subjects = self._subjects
        return [
            self._subscription(subjects.agents_status, self._on_agent_status, on_stop),
            self._subscription(subjects.agents_metrics, self._on_agent_metrics, on_stop),
            self._subscription(subjects.status, self._on_status, on_stop),
            self._subscription(subjects.metrics, self._on_metrics, on_stop),
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
        self._take(msg, self._subjects.status, codec.decode_heartbeat, self._heartbeat)

    async def _on_metrics(self, msg: Msg) -> None:
        self._take(msg, self._subjects.metrics, codec.decode_metrics, self._metrics)

    # The subscriptions {p}.*.status / {p}.*.metrics deliver only subjects of that form: the
    # agent's id is the slice between the prefix and the kind.

    async def _on_agent_status(self, msg: Msg) -> None:
        sender = msg.subject[self._head : -len(".status")]
        self._take(msg, self._subjects.agents_status, codec.decode_heartbeat, self._heartbeat, sender)

    async def _on_agent_metrics(self, msg: Msg) -> None:
        sender = msg.subject[self._head : -len(".metrics")]
        self._take(msg, self._subjects.agents_metrics, codec.decode_metrics, self._metrics, sender)

    def _take(
        self,
        msg: Msg,
        key: str,
        decode: Callable[[bytes], Heartbeat | MetricsReport],
        handler: Callable[[Any], None] | None,
        sender: str | None = None,
    ) -> None:
        """sender: the agent whose own subject the message came on, which it must be about."""
        self.messages_in[key] += 1
        try:
            value = decode(msg.data)
            if sender is not None and value.agent_id != sender:
                codec.check_sender(value, sender)
        except codec.MalformedMessage as exc:
            self._malformed.record(key, exc.reason, size=len(msg.data))
            return
        self._deliver(key, handler, value)

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
