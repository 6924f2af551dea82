"""NatsBus: opmasd's one NATS connection, the AgentBus of bus/base.py, built from its parts.

- It never gives up: the first connect and every reconnect retry forever in the background,
  so the daemon starts and supervises agents with NATS down; meanwhile requests raise
  BusUnavailable. Registrations (subscriptions, services) asked for before the first connect
  are set up when it succeeds; nats-py replays them after every reconnect.
- What travels over it is in the parts: the heartbeat and metrics intake (intake.py),
  commands to agents and their replies (agent_commands.py), micro services (micro.py) and request handlers run
  concurrently (serving.py). Bad input is counted in one malformed BurstLog they share.
- nats-py's async errors are logged, never raised into its reader. Every task it starts has
  an owner that stops it (the connector here, request tasks in serving.RequestRunner);
  nats-py's own per-subscription tasks end with drain/close.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from opmasd.bus.agent_commands import AgentCommands
from opmasd.bus.base import HeartbeatHandler, MetricsHandler
from opmasd.bus.burst import BurstLog
from opmasd.bus.intake import Intake
from opmasd.bus.login import NatsLogin
from opmasd.bus.micro import ServiceDescription, ServiceEndpoint, service_registration
from opmasd.bus.registration import Registration, Teardown
from opmasd.bus.serving import RequestHandler, RequestRunner
from opmasd.bus.subjects import Subjects
from opmasd.bus.urls import check_url, uses_tls
from opmasd.core.errors import BusRejected, BusUnavailable
from opmasd.core.messages import CommandReply
from opmasd.core.tasks import TaskOwner
from opmasd.core.urls import split_servers, without_credentials

log = structlog.get_logger(__name__)

# How long connect() waits for the first connection before returning a bus still connecting.
INITIAL_WAIT = 2.0
CLOSE_TIMEOUT = 5.0
DEFAULT_MAX_PAYLOAD = 1024 * 1024


@dataclass(frozen=True)
class ConnectOptions:
    """nats-py knobs worth choosing; the defaults suit a daemon."""

    name: str = "opmasd"
    connect_timeout: int = 2
    reconnect_time_wait: int = 1
    ping_interval: int = 20
    max_outstanding_pings: int = 3
    # Bytes buffered for publishing while reconnecting, after which publish fails.
    reconnect_buffer: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class BusStats:
    connected: bool
    messages_in: Mapping[str, int] = field(default_factory=dict)
    messages_out: int = 0
    requests_sent: int = 0
    malformed: Mapping[str, int] = field(default_factory=dict)
    handler_errors: int = 0
    async_errors: Mapping[str, int] = field(default_factory=dict)
    disconnects: int = 0
    reconnects: int = 0


class BusSettings(TypedDict, total=False):
    """NatsBus's keyword settings, so connect() passes them on without repeating them."""

    login: NatsLogin | None
    subjects: Subjects | None
    agent_url: str | None
    options: ConnectOptions | None


class NatsBus:
    def __init__(
        self,
        url: str,
        *,
        login: NatsLogin | None = None,
        subjects: Subjects | None = None,
        agent_url: str | None = None,
        options: ConnectOptions | None = None,
    ) -> None:
        self._servers = split_servers(url)
        if not self._servers:
            raise ValueError("NatsBus needs a NATS URL")
        for server in self._servers:
            check_url(server)
        self.subjects = subjects or Subjects()
        self._agent_url = agent_url or without_credentials(url)
        self._login = login or NatsLogin()
        self._tls = self._login.tls_context() if uses_tls(self._servers) else None
        self._options = options or ConnectOptions()
        self._nc = Client()
        self._tasks = TaskOwner("nats-bus")
        self._connected_once = asyncio.Event()
        self._registrations: list[Registration] = []
        self._closing = False
        # One tally of malformed input, keyed by subject: agent messages and agents' replies.
        self._malformed = BurstLog("malformed message")
        self._async_errors = BurstLog("NATS client error")
        self._intake = Intake(self.subjects, self._malformed)
        self._agents = AgentCommands(self._nc, self.subjects, self._malformed, lambda: self.is_connected)
        self._served_in: Counter[str] = Counter()  # requests to serve() subjects
        self._messages_out = 0
        self._disconnects = 0
        self._reconnects = 0

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, url: str, *, initial_wait: float = INITIAL_WAIT, **settings: Unpack[BusSettings]
    ) -> NatsBus:
        """A bus connecting to url; returns connected, or after initial_wait still connecting."""
        bus = cls(url, **settings)
        bus.start()
        if not await bus.wait_connected(initial_wait):
            log.warning("NATS not reachable yet; connecting in the background", servers=bus._agent_url)
        return bus

    def start(self) -> None:
        """Begin connecting (forever, in the background); subscribe to the intake subjects and
        to the inbox of agents' replies."""
        self._registrations.extend(self._intake.registrations(on_stop=self._forget))
        self._registrations.append(self._agents.registration(on_stop=self._forget))
        self._tasks.spawn(self._connect_forever(), "connect")

    async def _connect_forever(self) -> None:
        opts = self._options
        await self._nc.connect(
            self._servers,
            name=opts.name,
            tls=self._tls,
            **self._login.connect_options(),
            allow_reconnect=True,
            # -1 also makes nats-py's *initial* connect retry until it succeeds.
            max_reconnect_attempts=-1,
            reconnect_time_wait=opts.reconnect_time_wait,
            connect_timeout=opts.connect_timeout,
            ping_interval=opts.ping_interval,
            max_outstanding_pings=opts.max_outstanding_pings,
            pending_size=opts.reconnect_buffer,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        log.info("connected to NATS", server=self._connected_server(), prefix=self.subjects.prefix)
        # Registrations made while this runs are appended to the list and applied here too.
        index = 0
        while index < len(self._registrations):
            await self._apply(self._registrations[index])
            index += 1
        self._connected_once.set()

    async def _apply(self, registration: Registration) -> None:
        try:
            await registration.apply(self._nc)
        except (nats.errors.Error, ValueError) as exc:
            log.error("bus registration failed", what=registration.what, error=str(exc))

    async def wait_connected(self, timeout: float) -> bool:
        """Whether the bus is (or within timeout becomes) connected with its subscriptions."""
        try:
            await asyncio.wait_for(self._connected_once.wait(), timeout)
        except TimeoutError:
            return False
        return self.is_connected

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop everything registered, drain the connection (up to timeout), close it."""
        if self._closing:
            return
        self._closing = True
        for registration in list(self._registrations):
            await registration.stop(grace=timeout)
        await self._tasks.close()  # a connect still in progress ends here
        if self._nc.is_connected:
            try:
                await asyncio.wait_for(self._nc.drain(), timeout)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                log.warning("NATS drain incomplete; closing", error=str(exc) or type(exc).__name__)
        if not self._nc.is_closed:
            try:
                await self._nc.close()
            except (OSError, nats.errors.Error) as exc:
                # nats-py flushes on close and fails when the server just went away.
                log.info("NATS connection closed uncleanly", error=str(exc) or type(exc).__name__)
        self._malformed.close()
        self._intake.close()
        self._async_errors.close()
        log.info("NATS connection closed", stats=self.stats())

    # -- callbacks from nats-py: log, count, never raise ----------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._async_errors.record(f"slow consumer on {exc.subject}", "messages dropped")
        else:
            self._async_errors.record(type(exc).__name__, str(exc) or repr(exc))

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self._disconnects += 1
        log.warning("disconnected from NATS; reconnecting", servers=self._agent_url)

    async def _on_reconnected(self) -> None:
        self._reconnects += 1
        log.info("reconnected to NATS", server=self._connected_server())

    async def _on_closed(self) -> None:
        log.debug("NATS connection closed by the client")

    def _connected_server(self) -> str:
        uri = self._nc.connected_url
        return f"{uri.scheme}://{uri.hostname}:{uri.port}" if uri is not None else ""

    # -- state ----------------------------------------------------------------------------------

    @property
    def agent_url(self) -> str:
        return self._agent_url

    @property
    def is_connected(self) -> bool:
        return self._nc.is_connected and self._connected_once.is_set() and not self._closing

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (its max_payload; 1 MiB by default)."""
        return int(self._nc.max_payload) if self._nc.is_connected else DEFAULT_MAX_PAYLOAD

    # -- the AgentBus parts: agent → manager, manager → agent ----------------------------------

    def set_handlers(self, heartbeat: HeartbeatHandler, metrics: MetricsHandler) -> None:
        self._intake.set_handlers(heartbeat, metrics)

    async def command_agent(
        self, agent_id: str, command: str, params: Mapping[str, Any], timeout: float
    ) -> CommandReply:
        return await self._agents.command_agent(agent_id, command, params, timeout)

    # -- serving and publishing -----------------------------------------------------------------

    async def publish(self, subject: str, payload: bytes) -> None:
        if not self.is_connected:
            raise BusUnavailable("not connected to NATS")
        try:
            await self._nc.publish(subject, payload)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise BusUnavailable(f"NATS connection lost: {exc}") from None
        except nats.errors.MaxPayloadError:
            raise BusRejected(f"{len(payload)} bytes are more than the NATS server takes") from None
        self._messages_out += 1

    async def serve(self, subject: str, handler: RequestHandler, queue: str | None = None) -> Registration:
        """Answer requests on subject with handler (each in its own task); set up once connected."""
        runner = RequestRunner(subject)

        async def on_msg(msg: Msg) -> None:
            self._served_in[msg.subject] += 1
            reply = self._reply_to(msg.reply) if msg.reply else None
            await runner.dispatch(subject, msg.data, handler, reply)

        async def setup(nc: Client) -> Teardown:
            sub = await nc.subscribe(subject, queue=queue or "", cb=on_msg)
            return sub.unsubscribe

        return await self._register(Registration(f"serve {subject}", setup, runner, self._forget))

    async def add_service(
        self, description: ServiceDescription, endpoints: Sequence[ServiceEndpoint]
    ) -> Registration:
        """A NATS micro service (discoverable via $SRV.*) whose endpoints are request handlers."""
        return await self._register(service_registration(description, endpoints, self._forget))

    def _reply_to(self, reply_subject: str) -> Callable[[bytes], Awaitable[None]]:
        async def reply(payload: bytes) -> None:
            await self._nc.publish(reply_subject, payload)
            self._messages_out += 1

        return reply

    async def _register(self, registration: Registration) -> Registration:
        if self._closing:
            raise BusUnavailable("the bus is closed")
        self._registrations.append(registration)
        if self._connected_once.is_set():
            await self._apply(registration)
        return registration

    def _forget(self, registration: Registration) -> None:
        # While the first connect applies the list by index, a stopped registration stays
        # in it (its _apply does nothing) so that no other one is skipped.
        if self._connected_once.is_set() and registration in self._registrations:
            self._registrations.remove(registration)

    # -- observability --------------------------------------------------------------------------

    def malformed_counts(self) -> dict[str, int]:
        return self._malformed.counts()

    def stats(self) -> BusStats:
        return BusStats(
            connected=self.is_connected,
            messages_in=dict(self._intake.messages_in + self._served_in),
            messages_out=self._messages_out,
            requests_sent=self._agents.requests_sent,
            malformed=self._malformed.counts(),
            handler_errors=self._intake.handler_errors,
            async_errors=self._async_errors.counts(),
            disconnects=self._disconnects,
            reconnects=self._reconnects,
        )
