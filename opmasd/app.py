"""The daemon's life in plain phases: startup → main loop → shutdown.

Components start in dependency order (store → runtime → manager → api) and stop in reverse,
with the sd_notify messages at the phase boundaries. Signal handling is ours alone: SIGTERM
and SIGINT ask for a graceful exit (a second one forces it), SIGHUP reloads the
configuration and rescans the agents directories.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog

import opmasd
from opmasd import directories
from opmasd.api.audit_records import Auditor
from opmasd.api.auth import SERVICES, Gate
from opmasd.api.auth_interceptor import AuthInterceptor
from opmasd.api.grpc_server import GrpcListeners, GrpcServer, socket_gid
from opmasd.api.health import DaemonHealth
from opmasd.api.metrics import DaemonMetrics
from opmasd.api.nats_api import NatsManagerApi
from opmasd.api.refusal_pacing import RefusalPacer
from opmasd.api.rest.comments import load_descriptor_set
from opmasd.api.rest.gateway import RestGateway
from opmasd.api.rest.openapi import openapi_document
from opmasd.api.rest.rules import routes_of
from opmasd.api.rest.server import Endpoints, HttpListeners, HttpServer
from opmasd.api.tcp_front import RELAY_SOCKET
from opmasd.api.tls import ServerTls, reload_tls
from opmasd.bus.agent_logins import EmbeddedAgentLogins
from opmasd.bus.connection import NatsBus
from opmasd.bus.embedded import USER as EMBEDDED_NATS_USER
from opmasd.bus.embedded import EmbeddedNatsServer
from opmasd.bus.embedded_users import DataSubjects
from opmasd.bus.login import NatsLogin
from opmasd.bus.manager_service import ManagerService
from opmasd.bus.subjects import Subjects
from opmasd.config import Config, ConfigError, load_config
from opmasd.config.manager_settings import manager_settings
from opmasd.config.nats_login import nats_login
from opmasd.core.auth import Role
from opmasd.core.clock import SYSTEM_CLOCK
from opmasd.core.model import RuntimeKind
from opmasd.core.serial_thread import SerialThread
from opmasd.core.tasks import TaskOwner
from opmasd.core.urls import redacted
from opmasd.instance_lock import InstanceLock
from opmasd.logging import configure_logging
from opmasd.manager import AgentManager
from opmasd.runtime.base import Runtime
from opmasd.runtime.fdlimit import raise_open_files_limit
from opmasd.runtime.process import ProcessRuntime
from opmasd.store.base import AgentStore
from opmasd.store.opening import open_store
from opmasd.systemd.agent_units import connect_systemd
from opmasd.systemd.debug_hang import install_debug_hang
from opmasd.systemd.notify import Notifier
from opmasd.systemd.process_scopes import agent_cgroups, connect_process_scopes
from opmasd.systemd.restart_job import restart_pending

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Daemon:
    def __init__(
        self, config: Config, config_path: Path | None, rest_socket: socket.socket | None = None
    ) -> None:
        self.config = config
        self._rest_socket = rest_socket  # the one systemd passed for rest.address (listen_fds.py)
        self._config_path = config_path
        self.notifier = Notifier()
        self.should_exit = asyncio.Event()
        self._force_exit = False
        self._reload_failed = ""  # shown in STATUS= until a reload succeeds
        self._forced = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._tasks = TaskOwner("daemon")
        self._lock = InstanceLock(config.service.state_dir / "opmasd.lock")
        self._store: AgentStore | None = None
        self._runtimes: dict[RuntimeKind, Runtime] = {}
        self._embedded_nats: EmbeddedNatsServer | None = None
        self._agent_logins: EmbeddedAgentLogins | None = None  # the embedded server's, per agent
        self._bus: NatsBus | None = None
        self._manager_service: ManagerService | None = None
        self.manager: AgentManager | None = None
        self._grpc: GrpcServer | None = None
        self._http: HttpServer | None = None
        self._metrics: DaemonMetrics | None = None
        self._health: DaemonHealth | None = None
        # TLS of the TCP listeners (tls section); a reload replaces its files.
        self._tls = ServerTls(config.tls.files) if config.tls.files is not None else None

    async def serve(self) -> None:
        self._install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    # -- phases ---------------------------------------------------------------------------------

    async def startup(self) -> None:
        config = self.config
        service = config.service
        directories.tighten_umask()
        directories.prepare(
            (service.state_dir, service.runtime_dir, service.log_dir),
            service.runtime_dir,
            socket_gid(config.auth.socket_group),
        )
        if config.grpc.viewer_socket is not None:  # its viewers must reach it
            directories.let_through(config.grpc.viewer_socket.parent)
        self._lock.acquire()
        self.notifier.status("opening the store")
        # Off the loop: opening may wait out a connect timeout (PostgreSQL unreachable).
        self._store = await _off_the_loop(
            lambda: open_store(
                config.database.url,
                node=config.service.node,
                state_dir=config.service.state_dir,
                pool_size=config.database.pool_size,
            ),
            "open the store",
        )
        scopes = await connect_process_scopes(config.agents, self._source())
        process = ProcessRuntime(
            config.service.log_dir / "agents",
            log_max_bytes=config.agents.log_max_bytes,
            log_backups=config.agents.log_backups,
            cgroups=agent_cgroups(config.agents, config.service.state_dir, self._source())
            if scopes is None
            else None,
            child_open_files=raise_open_files_limit(),
            scopes=scopes,
        )
        self._runtimes[RuntimeKind.PROCESS] = process
        secret = (config.service.log_dir, *([self._config_path] if self._config_path else []))
        units, no_units = await connect_systemd(
            config.agents, self._source(), config.service.state_dir, config.service.runtime_dir, secret
        )
        if units is not None:
            self._runtimes[RuntimeKind.SYSTEMD] = units
        self._bus = await self._start_bus(self._store)
        self.manager = AgentManager(
            self._store,
            self._runtimes,
            manager_settings(config),
            unavailable_runtimes={RuntimeKind.SYSTEMD: no_units},
            agent_environment=self._nats_agent_environment(),
            bus=self._bus,
            logins=self._agent_logins,
        )
        self.notifier.status("recovering agents")
        await self.manager.start()
        # One gate (and one pace for refusals) for every entry point.
        pacer = RefusalPacer(SYSTEM_CLOCK)
        gate = Gate(self.manager.tokens.verify, tokens_required=config.auth.enabled, pacer=pacer)
        auditor = Auditor(self.manager.audit, gate.roles)
        # The NATS manager API: the bus serves the subjects, the api's dispatch table answers.
        dispatch = NatsManagerApi(self.manager, self._bus.subjects.manager_command, gate, auditor)
        self._manager_service = ManagerService(
            self._bus, dispatch.handle, node=self.manager.settings.node, version=opmasd.__version__
        )
        await self._manager_service.start()
        bus = self._bus
        self._metrics = DaemonMetrics(self.manager, lambda: bus.is_connected)
        self._grpc = GrpcServer(
            self.manager,
            GrpcListeners(
                socket_path=config.grpc.socket,
                socket_mode=config.grpc.socket_mode,
                address=config.grpc.address or "",
                socket_gid=socket_gid(config.auth.socket_group),
                tls=self._tls,
                max_connections=config.grpc.max_connections,
                relay_socket_path=config.service.runtime_dir / RELAY_SOCKET,
                viewer_socket_path=config.grpc.viewer_socket,
                viewer_socket_mode=config.grpc.viewer_socket_mode,
            ),
            # Metrics first: they count the calls the gate refuses too.
            interceptors=[self._metrics.interceptor, AuthInterceptor(gate, auditor)],
            viewer_interceptors=[self._metrics.interceptor, AuthInterceptor(gate, auditor, Role.VIEWER)],
            tcp_interceptors=[self._metrics.interceptor, AuthInterceptor(gate, auditor, relayed=True)],
        )
        await self._grpc.start()
        if self._tls is not None:
            self._tls.log_serving("TLS on the TCP listeners")
        self._health = DaemonHealth(self.manager, lambda: bus.is_connected, self._grpc)
        await self._health.start()
        if config.rest.enabled and (config.rest.address or config.rest.socket):
            self._http = await self._start_http(gate, auditor)
        # What start-up made (modules, descriptors, the agents' records) lives as long as the
        # daemon: out of the collector's way, so that its full collections stop rescanning it
        # (they showed as pauses of tens of ms in the middle of a 500-agent stop).
        gc.collect()
        gc.freeze()
        self.notifier.ready(self._status_line())
        log.info(
            "opmasd ready",
            node=config.service.node,
            database=redacted(config.database.url),
            agents=len(self.manager.list_agents()),
        )
        self._tasks.spawn(self._heartbeat_systemd(), "sd-notify")

    async def _start_http(self, gate: Gate, auditor: Auditor) -> HttpServer:
        """REST (from the proto's http rules), the OpenAPI document, /metrics, /healthz, /readyz.

        The gateway calls the gRPC servicer in-process through the server's own interceptors
        (api/local_calls.py), so every check a gRPC client meets applies to REST.
        """
        config = self.config
        assert self._grpc is not None
        routes = routes_of(list(SERVICES))
        gateway = RestGateway(routes, self._grpc.local_channel(), config.rest.max_body_bytes)
        assert self._metrics is not None and self._health is not None
        endpoints = Endpoints(
            openapi=lambda: openapi_document(
                routes, "OPMAS agent manager", opmasd.__version__, load_descriptor_set()
            ),
            metrics=self._metrics.render,
            alive=self._health.alive,
            ready=self._health.ready,
        )
        server = HttpServer(
            gateway,
            endpoints,
            HttpListeners(
                address=config.rest.address or "",
                socket_path=config.rest.socket,
                socket_mode=config.rest.socket_mode,
                socket_gid=socket_gid(config.auth.socket_group),
                ssl_context=self._tls.rest_context() if self._tls is not None else None,
                passed_socket=self._rest_socket,
            ),
            max_connections=config.rest.max_connections,
            grace=config.grpc.grace_period,
            gate=gate,
            auditor=auditor,
        )
        await server.start()
        return server

    def _nats_agent_environment(self) -> dict[str, str]:
        """What every agent needs to reach NATS (NATS_URL comes from the bus). Never opmasd's
        login: each agent gets its own from the embedded server's logins, and none from opmasd
        with an external server (its spec's environment may give it one)."""
        return {"NATS_SUBJECT_PREFIX": self.config.nats.subject_prefix}

    def _source(self) -> str:
        return str(self._config_path) if self._config_path else "configuration"

    async def _start_bus(self, store: AgentStore) -> NatsBus:
        """The embedded nats-server when nats.url is empty, then the connection.

        An external NATS that is down does not stop opmasd from starting: agents are supervised
        all the same, and the bus keeps connecting in the background.
        """
        nats = self.config.nats
        url, login, subjects = nats.url, nats_login(nats), Subjects(nats.subject_prefix)
        if not url:
            self.notifier.status("starting the embedded NATS server")
            self._embedded_nats = EmbeddedNatsServer(
                self.config.service.state_dir / "nats",
                subjects=subjects,
                data=DataSubjects(nats.agent_publish, nats.agent_subscribe),
            )
            self._agent_logins = EmbeddedAgentLogins(self._embedded_nats)
            # This node's agents in the first configuration: those still running reconnect at once.
            known = await _off_the_loop(store.load_agents, "load agents")
            self._agent_logins.expect(known, self.config.service.node)
            url = await self._embedded_nats.start()
            login = NatsLogin(user=EMBEDDED_NATS_USER, password=self._embedded_nats.password)
        self.notifier.status("connecting to NATS")
        return await NatsBus.connect(url, login=login, subjects=subjects)

    async def main_loop(self) -> None:
        while not self.should_exit.is_set():
            reload_wait = asyncio.ensure_future(self._reload_requested.wait())
            exit_wait = asyncio.ensure_future(self.should_exit.wait())
            await asyncio.wait({reload_wait, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
            reload_wait.cancel()
            exit_wait.cancel()
            if self._reload_requested.is_set() and not self.should_exit.is_set():
                self._reload_requested.clear()
                await self.reload()

    async def shutdown(self) -> None:
        """Stop in reverse order. A second SIGTERM/SIGINT cuts the slow steps short (agents that
        will not die are left running, to be re-adopted by the next opmasd): exit within ~2 s."""
        self.notifier.stopping()
        log.info("opmasd shutting down")
        await self._tasks.close()
        grace = 0 if self._force_exit else self.config.grpc.grace_period
        # HTTP first: its calls go through the gRPC server, which must still be there for them.
        if self._http is not None:
            await self._unless_forced(self._http.stop(), "HTTP server")
        if self._health is not None:
            await self._health.stop()
        if self._manager_service is not None:
            await self._unless_forced(self._manager_service.stop(grace), "NATS manager API")
        if self._grpc is not None:
            await self._unless_forced(self._grpc.stop(grace), "gRPC server")
        if self.manager is not None:
            stop_agents = self.config.service.stop_agents_on_shutdown and not self._force_exit
            if stop_agents and await restart_pending() is not False:  # a restart (or unsure)
                stop_agents = False
            if not await self._unless_forced(self.manager.stop(stop_agents=stop_agents), "agents' stop"):
                # Cut short while agents were stopping: flush what is known and leave them be.
                await self.manager.stop(stop_agents=False)
        for runtime in self._runtimes.values():
            await runtime.aclose()
        # NATS goes last but for the store: agents being stopped may still talk to it.
        if self._bus is not None:
            await self._unless_forced(self._bus.close(timeout=0.5 if self._force_exit else 5.0), "NATS")
        if self._agent_logins is not None:
            await self._agent_logins.close()
        if self._embedded_nats is not None:
            await self._unless_forced(self._embedded_nats.stop(), "embedded NATS server")
        if self._store is not None:
            # Bounded: a call stuck on a frozen database holds the store's lock.
            try:
                await _off_the_loop(self._store.close, "close the store", timeout=2.0)
            except TimeoutError:
                log.error("the store did not close within 2s (a call is stuck on the database); leaving it")
        log.info("opmasd stopped")
        self.notifier.close()
        self._lock.release()

    async def _unless_forced(self, step: Coroutine[Any, Any, Any], what: str) -> bool:
        """Run a shutdown step; a second exit request (now or during it) cuts it short.
        Whether it ran to its end."""
        task = asyncio.ensure_future(step)
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if task.done():
            task.result()  # its error, if any, is the step's
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.warning("shutdown step cut short by a second exit request", step=what)
        return False

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration, apply what can change live, rescan agents."""
        self.notifier.reloading()
        try:
            # Off the loop: it reads the configuration and the TLS files it names.
            new = await asyncio.to_thread(load_config, self._config_path, dict(os.environ))
        except ConfigError as exc:
            tls = (exc.key or "").lower().startswith(("tls.", "opmas_tls_"))
            kept = "configuration and TLS certificates" if tls else "configuration"
            log.error(f"configuration reload failed; keeping the running {kept}", error=str(exc))
            self._reload_failed = f"; reload failed: {exc}"
        else:
            self._reload_failed = ""
            fixed = [
                name
                for name in ("database", "grpc", "rest", "nats")
                if getattr(new, name) != getattr(self.config, name)
            ]
            for key in ("state_dir", "runtime_dir", "log_dir", "node"):
                if getattr(new.service, key) != getattr(self.config.service, key):
                    fixed.append(f"service.{key}")
            if not await reload_tls(self._tls, new.tls.files):
                fixed.append("tls")  # turned on or off: the listeners are made at start
            if fixed:
                log.warning("configuration sections changed that apply only at restart", sections=fixed)
            configure_logging(new.service.log_level, new.service.log_format)
            service = dataclasses.replace(
                new.service,
                state_dir=self.config.service.state_dir,
                runtime_dir=self.config.service.runtime_dir,
                log_dir=self.config.service.log_dir,
                node=self.config.service.node,
            )
            self.config = dataclasses.replace(self.config, service=service, agents=new.agents)
            if self.manager is not None:
                self.manager.settings = manager_settings(self.config)
            log.info("configuration reloaded")
        if self.manager is not None:
            report = await self.manager.discover()
            log.info("agents rescanned", found=len(report.agents), errors=len(report.errors))
        self.notifier.ready(self._status_line())

    # -- signals and systemd --------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_exit, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_exit, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        install_debug_hang(loop)  # only with OPMAS_DEBUG_HANG_SIGNAL=1: watchdog tests

    def request_exit(self, why: str) -> None:
        if self.should_exit.is_set():
            log.warning("second exit request: stopping without waiting for agents", signal=why)
            self._force_exit = True
            self._forced.set()
        else:
            log.info("exit requested", signal=why)
        self.should_exit.set()

    def _status_line(self) -> str:
        if self.manager is None:
            return "starting"
        total, running = self.manager.counts()
        return f"{total} agents, {running} running{self._reload_failed}"

    async def _heartbeat_systemd(self) -> None:
        """WATCHDOG=1 from the event loop itself (a blocked loop misses it) and a fresh STATUS."""
        interval = self.notifier.watchdog_interval()
        monitoring = self.config.service.monitoring_interval
        period = min(interval, monitoring) if interval else monitoring
        last_status = ""
        while True:
            if interval:
                self.notifier.watchdog()
            status = self._status_line()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            await asyncio.sleep(period)


async def _off_the_loop(call: Callable[[], T], what: str, timeout: float | None = None) -> T:
    """call on a daemon thread of its own (one stuck on a database never holds up the exit)."""
    thread = SerialThread(f"opmasd-{what.replace(' ', '-')}")
    try:
        return await asyncio.wait_for(thread.run(call, what), timeout)
    finally:
        thread.close()
