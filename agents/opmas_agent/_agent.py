"""The Agent base class: an agent's life, its commands, heartbeats and metrics, over a Transport.

Subclass it, override `setup` / `run` / `teardown` as needed, add commands with `@command`,
and start it with `opmas_agent.run(MyAgent)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from ._commands import MARK, CommandError, Request, command, command_name_of, encode, parse_request, response
from ._context import REDACTED, AgentContext, ConfigError, is_secret, parser_for
from ._throttle import Throttle
from ._time import timestamp
from ._transport import Message, Transport

T = TypeVar("T")
DataHandler = Callable[[str, dict[str, Any]], Awaitable[None] | None]
SDK_VERSION = "1.0.0"
# After a stop request, run() gets this long to return by itself (a loop on `self.sleep`
# does at once) before it is cancelled.
RUN_GRACE = 1.0
# Counters present from the start, so the metrics always carry the same keys.
COUNTERS = (
    "messages_received",
    "messages_malformed",
    "handler_errors",
    "commands_handled",
    "commands_failed",
    "commands_malformed",
    "published",
    "publish_failed",
    "heartbeats",
)


def _collect_commands(cls: type) -> dict[str, str]:
    """Command name -> method name over the MRO; a subclass's handler replaces its base's."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            name = getattr(value, MARK, None)
            if isinstance(name, str):
                found[name] = attr
    return found


class Agent:
    """Base class of OPMAS agents.

    Class attributes:
        default_id: the agent id when AGENT_ID is unset (running it by hand).

    Instance attributes an agent uses:
        context: the AgentContext (id, name, NATS URL, subject prefix, environment).
        log: a structlog logger; JSON lines on stdout under `run`.
        metrics: name -> number, published on `{prefix}.{agent_id}.metrics` with every heartbeat.
        status: the heartbeat's status, "running" unless the agent says otherwise ("degraded").
        status_metadata: extra keys for the heartbeat's metadata.
        config: the effective settings read with `setting`, shown by the `config` command.
        clock: the wall clock (`time.time`); tests replace it.
    """

    default_id: ClassVar[str] = "agent"
    _command_methods: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._command_methods = _collect_commands(cls)

    def __init__(self, context: AgentContext, transport: Transport) -> None:
        self.context = context
        self.log: FilteringBoundLogger = structlog.get_logger("opmas_agent").bind(agent_id=context.agent_id)
        self.metrics: dict[str, float] = {}
        self.status = "running"
        self.status_metadata: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.clock: Callable[[], float] = time.time
        self._transport = transport
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # the heartbeat loop's: stop requested, or (re)connected
        self._stop_reason = ""
        self._exit_code = 0
        self._started = time.monotonic()
        self._started_at = timestamp()
        self._throttle = Throttle()

    # -- what a subclass overrides ---------------------------------------------------------

    async def setup(self) -> None:
        """Read settings, subscribe to data subjects. Raise ConfigError for a bad setting."""

    async def run(self) -> None:
        """The agent's own loop, if it has one; the default just waits to be stopped.

        A periodic loop reads `while not await self.sleep(interval): ...`, so it ends promptly.
        """
        await self._stop.wait()

    async def teardown(self) -> None:
        """Release resources. Runs after data stopped arriving; publishing still works here."""

    async def on_command(self, command: str, params: dict[str, Any]) -> Any:
        """Commands with no `@command` handler come here; the default is an error reply."""
        raise CommandError(f"unknown command {command!r}; known: {', '.join(self.commands)}")

    # -- services ---------------------------------------------------------------------------

    @property
    def agent_id(self) -> str:
        return self.context.agent_id

    @property
    def commands(self) -> list[str]:
        """Names of the commands this agent answers (built-in and `@command`)."""
        return sorted(self._command_methods)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started

    def setting(
        self, name: str, default: T, parse: Callable[[str], T] | None = None, *, secret: bool = False
    ) -> T:
        """The environment variable `name`, parsed like `default` (or with `parse`), else default.

        The value is recorded in `self.config` for the `config` command (redacted when `secret`
        or when the name looks like a secret). A value that does not parse raises ConfigError.

        Example:
            self.threshold = self.setting("AUTH_FAIL_THRESHOLD", 5)
        """
        raw = self.context.env.get(name, "").strip()
        value = default
        if raw:
            parser = parse or parser_for(name, default)
            try:
                value = parser(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None
        self.config[name] = REDACTED if secret or is_secret(name) else value
        return value

    async def publish(self, subject: str, payload: Mapping[str, Any]) -> bool:
        """Publish `payload` as JSON on `subject` (not prefixed); False when it was not sent."""
        sent = await self._transport.publish(subject, encode(payload))
        self._counters["published" if sent else "publish_failed"] += 1
        return sent

    async def subscribe(self, subject: str, handler: DataHandler, *, queue: str = "") -> None:
        """Call `handler(subject, record)` for each JSON object on `subject` (wildcards allowed).

        Messages that are not JSON objects are counted and logged, and a handler that raises is
        logged; neither stops the subscription. `queue` shares the load among instances.
        """

        async def deliver(msg: Message) -> None:
            self._counters["messages_received"] += 1
            try:
                record = json.loads(msg.data)
            except (UnicodeDecodeError, ValueError) as exc:
                record, error = None, f"not JSON: {exc}"
            else:
                error = "" if isinstance(record, dict) else "not a JSON object"
            if error or not isinstance(record, dict):
                self._counters["messages_malformed"] += 1
                self.throttled_warning("malformed message", subject=msg.subject, error=error)
                return
            try:
                outcome = handler(msg.subject, record)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                self._counters["handler_errors"] += 1
                self.throttled_warning(
                    "message handler failed", subject=msg.subject, error=repr(exc), exc_info=True
                )

        await self._transport.subscribe(subject, deliver, queue)

    def request_stop(self, reason: str = "requested", *, exit_code: int = 0) -> None:
        """Begin a graceful stop; a non-zero `exit_code` makes the process fail (and restart)."""
        self._exit_code = max(self._exit_code, exit_code)
        if not self._stop.is_set():
            self._stop_reason = reason
            self.log.info("stop requested", reason=reason)
            self._stop.set()
            self._wake.set()

    async def sleep(self, seconds: float) -> bool:
        """Wait `seconds` or until a stop is requested, whichever is first; True when stopping."""
        if not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    def heartbeat_payload(self) -> dict[str, Any]:
        """The `{prefix}.{agent_id}.status` message: `{agent_id, status, timestamp, metadata}`."""
        metadata: dict[str, Any] = {
            "name": self.context.name,
            "type": self.context.type,
            "version": self.context.version,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started_at": self._started_at,
            "uptime_seconds": round(self.uptime, 3),
            "heartbeat_interval": self.context.heartbeat_interval,
            "sdk": f"opmas_agent/{SDK_VERSION}",
        }
        metadata.update(self.status_metadata)
        return {
            "agent_id": self.agent_id,
            "status": self.status,
            "timestamp": timestamp(),
            "metadata": metadata,
        }

    def metrics_payload(self) -> dict[str, Any]:
        """The `{prefix}.{agent_id}.metrics` message: the SDK's counters, uptime, then `self.metrics`."""
        metrics: dict[str, float] = {"uptime_seconds": round(self.uptime, 3), **self._counters}
        metrics.update(self.metrics)
        return {"agent_id": self.agent_id, "timestamp": timestamp(), "metrics": metrics}

    async def send_heartbeat(self) -> None:
        """Publish the heartbeat and the metrics now (the loop also does, every interval)."""
        self._counters["heartbeats"] += 1
        try:
            # Its own subjects: a server that gives each agent its own login allows it no other.
            await self.publish(self.context.subject("status"), self.heartbeat_payload())
            await self.publish(self.context.subject("metrics"), self.metrics_payload())
        except (TypeError, ValueError) as exc:
            # A metric or metadata value that is not JSON: say so, keep the loop alive.
            self.throttled_warning("heartbeat not sent", error=repr(exc))

    # -- built-in commands ------------------------------------------------------------------

    @command("ping")
    def _ping(self, params: dict[str, Any]) -> str:
        return "pong"

    @command("status")
    def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "state": self.status,
            "agent_id": self.agent_id,
            "name": self.context.name,
            "type": self.context.type,
            "version": self.context.version,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "uptime_seconds": round(self.uptime, 3),
            "connected": self._transport.connected,
            "counters": dict(self._counters),
            "metrics": dict(self.metrics),
            "commands": self.commands,
        }

    @command("config")
    def _config(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**self.context.describe(), "settings": dict(self.config)}

    # -- the life of the agent ---------------------------------------------------------------

    async def serve(self) -> int:
        """Start, run until stopped, shut down; returns the process exit code (0, 1, or 2)."""
        self.log.info("agent starting", **self.context.describe())
        try:
            await self._start()
        except ConfigError as exc:
            self.log.error("invalid configuration", error=str(exc))
            await self._transport.close(1.0)
            return 2
        except Exception:
            self.log.exception("setup failed")
            await self._transport.close(1.0)
            return 1
        self.log.info("agent running", commands=self.commands)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._heartbeat_loop(), name="heartbeat")
            runner = tasks.create_task(self._run_guarded(), name="run")
            await self._stop.wait()
            done, _ = await asyncio.wait({runner}, timeout=RUN_GRACE)
            if not done:
                runner.cancel()
        return await self._shutdown()

    async def _start(self) -> None:
        await self._transport.start(self._wake.set)
        await self.setup()
        # Commands are taken only once setup is done, so no handler sees a half-built agent.
        for kind in ("command", "query"):
            await self._transport.subscribe(self.context.subject(kind), self._on_request)

    async def _run_guarded(self) -> None:
        try:
            await self.run()
        except Exception:
            self.log.exception("run() failed")
            self.request_stop("run() failed", exit_code=1)
        else:
            self.request_stop("run() returned")

    async def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            # While disconnected a heartbeat would only be dropped (or queued, to arrive stale);
            # the transport wakes this loop on (re)connect for an immediate one instead.
            if self._transport.connected:
                await self.send_heartbeat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.context.heartbeat_interval)

    async def _shutdown(self) -> int:
        """Stop receiving, teardown, a last heartbeat, flush and close — inside the stop timeout.

        teardown comes after the subscriptions are drained (no handler runs against a torn-down
        agent) and before the connection closes (so it can still publish final findings).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(1.0, self.context.stop_timeout - 1.0)

        def remaining() -> float:
            return max(0.2, deadline - loop.time())

        self.status = "stopping"
        await self._transport.stop_receiving(remaining() / 3)
        try:
            await asyncio.wait_for(self.teardown(), remaining() / 2)
        except TimeoutError:
            self.log.error("teardown timed out")
            self._exit_code = max(self._exit_code, 1)
        except Exception:
            self.log.exception("teardown failed")
            self._exit_code = max(self._exit_code, 1)
        # The manager learns the stop was deliberate before it sees the process exit.
        self.status = "stopped"
        if self._transport.connected:
            await self.send_heartbeat()
        await self._transport.close(remaining())
        self.log.info("agent stopped", reason=self._stop_reason, exit_code=self._exit_code)
        return self._exit_code

    # -- commands ----------------------------------------------------------------------------

    async def _on_request(self, msg: Message) -> None:
        try:
            request = parse_request(msg.data, self.agent_id)
        except CommandError as exc:
            self._counters["commands_malformed"] += 1
            self.throttled_warning("malformed command", subject=msg.subject, error=str(exc))
            reply = encode(response(command_name_of(msg.data), self.agent_id, error=str(exc)))
        else:
            reply = await self._dispatch(request)
        if msg.reply:
            await self._transport.publish(msg.reply, reply)
        # Every reply is also announced, for listeners that did not make the request.
        await self._transport.publish(self.context.subject("response"), reply)

    async def _dispatch(self, request: Request) -> bytes:
        name, params = request.command, request.params
        try:
            attr = self._command_methods.get(name)
            outcome = self.on_command(name, params) if attr is None else getattr(self, attr)(params)
            if inspect.isawaitable(outcome):
                outcome = await outcome
            # Encoded here so a result that is not JSON becomes an error reply, not a lost one.
            reply = encode(response(name, self.agent_id, result=outcome))
        except CommandError as exc:
            self._counters["commands_failed"] += 1
            self.log.info("command refused", command=name, error=str(exc))
            return encode(response(name, self.agent_id, error=str(exc)))
        except Exception as exc:
            self._counters["commands_failed"] += 1
            self.log.exception("command handler failed", command=name)
            return encode(response(name, self.agent_id, error=f"internal error: {type(exc).__name__}: {exc}"))
        self._counters["commands_handled"] += 1
        return reply

    def throttled_warning(self, event: str, **fields: Any) -> None:
        """A warning that may repeat at a high rate (one per bad record...): at most one line per
        `event` every 10 s, carrying how many were held back since the last."""
        suppressed = self._throttle.allow(event)
        if suppressed:
            fields["suppressed"] = suppressed  # lines of this kind held back since the last one
        if suppressed is not None:
            self.log.warning(event, **fields)


Agent._command_methods = _collect_commands(Agent)
