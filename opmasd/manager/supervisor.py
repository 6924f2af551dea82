"""Runs agents: start, stop, exits, restarts with backoff, re-adoption after a daemon restart.

The state machine of DESIGN §4 lives here, over the Runtime interface, so it is the same for
every backend and unit-tested with an in-memory runtime. One lock per agent serialises the
operations on it (start, stop, a backoff timer firing); exits arrive from the runtime as
callbacks and are handled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import structlog

from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.errors import FailedPrecondition, LaunchError
from opmasd.core.model import AgentRecord, AgentState, DesiredState, ExitInfo, ProcessHandle
from opmasd.core.tasks import TaskOwner
from opmasd.manager.launch import AgentLogins, NoAgentLogins, agent_base_environment, launch_request
from opmasd.manager.registry import AgentRegistry
from opmasd.manager.restart import RestartSettings, decide
from opmasd.manager.values import OperationResult
from opmasd.runtime.base import Runtime

log = structlog.get_logger(__name__)


def start_failed(agent_id: str, why: str) -> FailedPrecondition:
    """The error of a start that failed; `why` often says "failed to start" itself (the state
    reason, the restart decision), and the message says it once."""
    return FailedPrecondition(f"agent {agent_id} failed to start: {why.removeprefix('failed to start: ')}")


@dataclass
class _AgentLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Tasks holding or waiting for it.
    users: int = 0


class Supervisor:
    def __init__(
        self,
        registry: AgentRegistry,
        runtime: Runtime,
        settings: RestartSettings,
        tasks: TaskOwner,
        agent_environment: Callable[[], Mapping[str, str]] = lambda: {},
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        self._registry = registry
        self._runtime = runtime
        # Public: a configuration reload (SIGHUP) replaces it.
        self.settings = settings
        self._tasks = tasks
        self._agent_environment = agent_environment
        # Each agent's own login to the bus (the manager sets the one app.py chose).
        self.logins: AgentLogins = NoAgentLogins()
        self._base_env = agent_base_environment(os.environ)
        self._locks: dict[str, _AgentLock] = {}
        self._restart_timers: dict[str, asyncio.Task[None]] = {}
        # An exit that arrived while its launch was still being recorded.
        self._early_exits: dict[str, tuple[ProcessHandle, ExitInfo]] = {}
        # Agents whose operator's change waits for its commit, and exits that arrived meanwhile
        # (see committing).
        self._committing: set[str] = set()
        self._deferred_exits: dict[str, tuple[ProcessHandle, ExitInfo]] = {}
        self._stopped_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # A launch in its start window (spec.start_seconds): the timer that promotes it, and
        # operators' starts waiting for the outcome (None: started; text: why it failed).
        self._promotions: dict[str, asyncio.Task[None]] = {}
        self._start_waiters: dict[str, list[asyncio.Future[str | None]]] = {}
        self._shutting_down = False
        # Restarts by the policy since the daemon started, after an exit (counted when decided,
        # like restart_count) and after heartbeat loss.
        self.restarts_after_exit = 0
        self.restarts_after_inactive = 0
        runtime.set_exit_handler(self._on_exit)

    @contextlib.asynccontextmanager
    async def lock(self, agent_id: str) -> AsyncIterator[None]:
        """Hold the agent's lock. A lock lives only while someone holds or awaits it, so that
        requests for ids that do not exist leave nothing behind."""
        entry = self._locks.get(agent_id)
        if entry is None:
            entry = self._locks[agent_id] = _AgentLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[agent_id]

    @contextlib.contextmanager
    def committing(self, agent_id: str) -> Iterator[None]:
        """While an operator's change to the agent (its desired state, its spec) waits for its
        commit, an exit of its process is held back, and handled after: on the change if it was
        committed, on the record as it was if the change was undone. Decided meanwhile, the exit
        would act on a change that may never be made (a stop refused, yet its agent not
        restarted). The caller holds the agent's lock, so nothing else acts on it meanwhile."""
        self._committing.add(agent_id)
        try:
            yield
        finally:
            self._committing.discard(agent_id)
            deferred = self._deferred_exits.pop(agent_id, None)
            if deferred is not None:
                self._on_exit(agent_id, *deferred)

    # -- operations; callers hold lock(agent_id) --------------------------------------------

    async def start(self, rec: AgentRecord, reason: str) -> OperationResult:
        if rec.pid is not None and rec.state.has_process and rec.state is not AgentState.STOPPING:
            if rec.desired is not DesiredState.RUNNING:
                rec.desired = DesiredState.RUNNING
                self._registry.save(rec)
            return OperationResult(rec, False, f"agent {rec.agent_id} is already running (pid {rec.pid})")
        self._cancel_restart(rec.agent_id)
        rec.desired = DesiredState.RUNNING
        rec.consecutive_failures = 0
        rec.restart_count = 0
        outcome = self._await_start(rec.agent_id)
        if not await self._launch(rec, reason):
            outcome.cancel()
            raise start_failed(rec.agent_id, rec.state_reason)
        result = OperationResult(rec, True, f"agent {rec.agent_id} started (pid {rec.pid})", pending=outcome)
        return await self.settled(result) if outcome.done() else result

    async def settled(self, result: OperationResult) -> OperationResult:
        """The start's outcome once its start window is over: "started" means it stayed up (or
        heartbeated); FailedPrecondition says why not. Await it without holding the agent's
        lock, so that a stop or a delete meanwhile is not held up by the window."""
        if result.pending is None:
            return result
        failure = await result.pending
        if failure is not None:
            raise start_failed(result.record.agent_id, failure)
        return OperationResult(result.record, result.changed, result.message)

    async def stop(self, rec: AgentRecord, reason: str, timeout: float | None = None) -> OperationResult:
        was_desired = rec.desired
        rec.desired = DesiredState.STOPPED
        self._cancel_restart(rec.agent_id)
        if rec.pid is not None:
            await self._terminate(rec, reason, timeout)
            return OperationResult(rec, True, f"agent {rec.agent_id} stopped")
        if rec.state is not AgentState.STOPPED:
            self._registry.transition(rec, AgentState.STOPPED, reason)
            return OperationResult(rec, True, f"agent {rec.agent_id} stopped")
        if was_desired is not DesiredState.STOPPED:
            self._registry.save(rec)
        return OperationResult(rec, False, f"agent {rec.agent_id} is already stopped")

    def begin_stop(self, rec: AgentRecord) -> None:
        """The SIGTERM of a stop or restart that follows at once, sent now: a bulk operation
        sends every agent's in one sweep (Runtime.begin_terminate). Its desired state is
        committed already."""
        if rec.pid is not None:
            self._runtime.begin_terminate(rec.agent_id)

    async def restart(self, rec: AgentRecord, reason: str) -> OperationResult:
        if rec.pid is not None:
            await self._terminate(rec, reason, None)
        result = await self.start(rec, reason)
        message = f"agent {rec.agent_id} restarted (pid {result.record.pid})"
        return OperationResult(rec, True, message, pending=result.pending)

    async def restart_inactive(self, agent_id: str) -> None:
        """restart_on_inactive: restart an agent that stopped heartbeating, if it still has not."""
        async with self.lock(agent_id):
            rec = self._registry.get(agent_id)
            if rec is None or rec.state is not AgentState.INACTIVE:
                return
            restarts = rec.restart_count
            try:
                await self.restart(rec, f"{rec.state_reason}; restart_on_inactive")
            except FailedPrecondition as exc:
                log.warning("inactive agent could not be restarted", agent_id=agent_id, error=exc.message)
                return
            # A restart by policy, not by an operator: it counts like a crash restart.
            rec.restart_count = restarts + 1
            self.restarts_after_inactive += 1
            self._registry.save(rec)

    async def recover(self, rec: AgentRecord) -> bool:
        """Bring one agent loaded from the store in line with its desired state at daemon start.

        True when it was re-adopted with its desired state stopped: it is still to be stopped,
        which `stop_adopted` does for all of them at once, after the API is up (one after
        the other here, each taking up to its stop timeout, they held the daemon's start).
        """
        handle = rec.handle
        vanished = ""
        # Asked even without a recorded PID: a daemon killed between a spawn and its commit
        # left a process the runtime can still find (the agent's cgroup).
        adopted = self._runtime.adopt(rec.agent_id, handle)
        if adopted is not None or handle is not None:
            if adopted is not None:
                if handle is None:
                    age = max(0.0, self._clock.monotonic() - adopted.start_time)
                    rec.pid, rec.started_at = adopted.pid, self._clock.now() - timedelta(seconds=age)
                # The process's own start time: its age is exact, whatever the wall clock did.
                rec.pid_start_time = rec.started_monotonic = adopted.start_time
                if rec.last_heartbeat is not None and rec.started_at is not None:
                    if rec.last_heartbeat >= rec.started_at:
                        # It spoke NATS before: judged again, after the start-up grace.
                        rec.heard_monotonic = self._clock.monotonic()
                state = (
                    rec.state
                    if rec.state in (AgentState.RUNNING, AgentState.INACTIVE)
                    else AgentState.RUNNING
                )
                how = "re-adopted" if handle is not None else "found unrecorded process, adopted"
                self._registry.transition(rec, state, f"{how} pid {adopted.pid} after opmasd restart")
                return rec.desired is DesiredState.STOPPED
            assert handle is not None
            vanished = f"process {handle.pid} ended while opmasd was not running"
            _forget_process(rec)
            rec.last_exit = ExitInfo(exit_code=None, signal=None)
        if rec.desired is DesiredState.RUNNING:
            reason = f"{vanished}; " if vanished else ""
            if not await self._launch(rec, f"{reason}starting: desired state is running"):
                log.warning("agent could not be started at daemon start", agent_id=rec.agent_id)
        elif rec.state not in (AgentState.STOPPED, AgentState.ERROR):
            self._registry.transition(rec, AgentState.STOPPED, vanished or "desired state is stopped")
        return False

    async def stop_adopted(self, agent_ids: list[str]) -> None:
        """Stop, all at once, the re-adopted agents whose desired state is stopped (`recover`),
        each under its lock and only while that is still so (an operator may have started one)."""

        async def stop_one(agent_id: str) -> None:
            async with self.lock(agent_id):
                rec = self._registry.get(agent_id)
                if rec is not None and rec.pid is not None and rec.desired is DesiredState.STOPPED:
                    await self._terminate(rec, "desired state is stopped", None)

        results = await asyncio.gather(*(stop_one(a) for a in agent_ids), return_exceptions=True)
        for agent_id, result in zip(agent_ids, results, strict=True):
            if isinstance(result, Exception):
                log.error("re-adopted agent could not be stopped", agent_id=agent_id, error=str(result))

    async def shutdown(self, stop_agents: bool) -> None:
        """Daemon shutdown: no more restarts; stop every agent when asked (desired state kept)."""
        self._shutting_down = True
        for agent_id in list(self._restart_timers):
            self._cancel_restart(agent_id)
        if not stop_agents:
            return
        running = [rec for rec in self._registry.live() if rec.pid is not None]
        await asyncio.gather(
            *(self._terminate(rec, "opmasd is shutting down", None) for rec in running),
            return_exceptions=True,
        )

    # -- process control ----------------------------------------------------------------------

    async def _launch(self, rec: AgentRecord, reason: str) -> bool:
        """STARTING → RUNNING, or → ERROR when the program cannot be started."""
        rec.next_restart_at = None
        self._registry.transition(rec, AgentState.STARTING, reason)
        # Its own NATS login first, so that it can connect at once (bounded; never raises).
        await self.logins.admit(rec.agent_id)
        daemon_env = {**self._agent_environment(), **self.logins.environment(rec.agent_id)}
        try:
            handle = await self._runtime.launch(launch_request(rec, self._base_env, daemon_env))
        except LaunchError as exc:
            _forget_process(rec)
            self._registry.transition(rec, AgentState.ERROR, f"failed to start: {exc}")
            return False
        rec.pid, rec.pid_start_time, rec.started_at = handle.pid, handle.start_time, self._clock.now()
        rec.started_monotonic = self._clock.monotonic()
        rec.heard_monotonic = None  # a new process is never judged by its predecessor's heartbeat
        window = rec.spec.start_seconds
        if window > 0:
            self._registry.save(rec)  # its PID, committed while it is still starting
            self._promotions[rec.agent_id] = self._tasks.spawn(
                self._promote_after(rec.agent_id, handle.pid, window), name=f"start-window:{rec.agent_id}"
            )
        else:
            self._promote(rec, f"started (pid {handle.pid})")
        early = self._early_exits.pop(rec.agent_id, None)
        if early is not None and early[0].pid == handle.pid:
            self._on_exit(rec.agent_id, *early)
        return True

    async def _terminate(self, rec: AgentRecord, reason: str, timeout: float | None) -> None:
        """→ STOPPING, then wait until the exit handler has recorded → STOPPED."""
        if rec.state is not AgentState.STOPPING:
            self._registry.transition(rec, AgentState.STOPPING, reason)
        stopped = asyncio.get_running_loop().create_future()
        self._stopped_waiters.setdefault(rec.agent_id, []).append(stopped)
        await self._runtime.terminate(rec.agent_id, rec.spec.stop_timeout if timeout is None else timeout)
        # The runtime reports the exit through _on_exit; it may land just after terminate returns.
        try:
            await asyncio.wait_for(asyncio.shield(stopped), timeout=5.0)
        except TimeoutError:
            log.error("runtime reported no exit after terminate", agent_id=rec.agent_id, pid=rec.pid)
            self._on_exit(rec.agent_id, ProcessHandle(rec.pid or 0, 0.0), ExitInfo(None, None))

    # -- the start window ------------------------------------------------------------------------

    def _await_start(self, agent_id: str) -> asyncio.Future[str | None]:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._start_waiters.setdefault(agent_id, []).append(future)
        return future

    def _settle_start(self, agent_id: str, failure: str | None) -> None:
        for waiter in self._start_waiters.pop(agent_id, []):
            if not waiter.done():
                waiter.set_result(failure)

    async def _promote_after(self, agent_id: str, pid: int, window: float) -> None:
        await self._clock.sleep(window)
        if self._promotions.get(agent_id) is asyncio.current_task():
            del self._promotions[agent_id]
        rec = self._registry.get(agent_id)
        if rec is not None and rec.pid == pid and rec.state is AgentState.STARTING:
            self._promote(rec, f"started (pid {pid}, up {window:g}s)")

    def _promote(self, rec: AgentRecord, reason: str) -> None:
        self._registry.transition(rec, AgentState.RUNNING, reason)
        self._settle_start(rec.agent_id, None)

    def started_by_heartbeat(self, rec: AgentRecord) -> None:
        """A heartbeat from an agent in its start window: it is up and speaking, so started."""
        if rec.state is not AgentState.STARTING or rec.pid is None:
            return
        promotion = self._promotions.pop(rec.agent_id, None)
        if promotion is not None:
            promotion.cancel()
        self._promote(rec, f"started (pid {rec.pid}, first heartbeat)")

    def _cancel_restart(self, agent_id: str) -> None:
        timer = self._restart_timers.pop(agent_id, None)
        if timer is not None:
            timer.cancel()

    def _on_exit(self, agent_id: str, handle: ProcessHandle, exit_info: ExitInfo) -> None:
        if agent_id in self._committing:
            self._deferred_exits[agent_id] = (handle, exit_info)
            return
        rec = self._registry.get(agent_id)
        if rec is None or rec.pid != handle.pid:
            if rec is not None and rec.state is AgentState.STARTING and rec.pid is None:
                self._early_exits[agent_id] = (handle, exit_info)
            else:
                log.debug("exit of a process no agent owns", agent_id=agent_id, pid=handle.pid)
            return
        started = rec.started_monotonic
        ran_for = None if started is None else max(0.0, self._clock.monotonic() - started)
        failed_start = rec.state is AgentState.STARTING
        promotion = self._promotions.pop(agent_id, None)
        if promotion is not None:
            promotion.cancel()
        _forget_process(rec)
        rec.last_exit = exit_info
        # An operator's start still waiting learns why it never got to running (a stop, the
        # daemon's shutdown, or an exit within the window); after a promotion none is waiting.
        lasted = "" if ran_for is None else f" after {ran_for:.3g}s"
        if rec.state is AgentState.STOPPING:
            self._settle_start(agent_id, f"stopped within its start window ({exit_info.reason}{lasted})")
        else:
            self._settle_start(agent_id, f"{exit_info.reason}{lasted}, within its start window")
        if rec.state is AgentState.STOPPING or rec.desired is DesiredState.STOPPED or self._shutting_down:
            self._registry.transition(rec, AgentState.STOPPED, f"stopped: {exit_info.reason}")
            for waiter in self._stopped_waiters.pop(agent_id, []):
                if not waiter.done():
                    waiter.set_result(None)
            return
        decision = decide(
            rec.spec.restart_policy, exit_info, rec.consecutive_failures, ran_for, self.settings, failed_start
        )
        rec.consecutive_failures = decision.failures
        if not decision.restart:
            clean = exit_info.success and not failed_start and decision.failures <= self.settings.max_restarts
            self._registry.transition(rec, AgentState.STOPPED if clean else AgentState.ERROR, decision.reason)
            return
        rec.restart_count += 1
        self.restarts_after_exit += 1
        rec.next_restart_at = self._clock.now() + timedelta(seconds=decision.delay)
        self._registry.transition(rec, AgentState.BACKOFF, decision.reason)
        self._restart_timers[agent_id] = self._tasks.spawn(
            self._restart_after(agent_id, decision.delay), name=f"restart:{agent_id}"
        )

    async def _restart_after(self, agent_id: str, delay: float) -> None:
        await self._clock.sleep(delay)
        async with self.lock(agent_id):
            if self._restart_timers.get(agent_id) is asyncio.current_task():
                del self._restart_timers[agent_id]
            rec = self._registry.get(agent_id)
            if rec is None or rec.state is not AgentState.BACKOFF or rec.desired is not DesiredState.RUNNING:
                return
            if self._shutting_down:
                return
            await self._launch(rec, f"restarting after {rec.last_exit.reason if rec.last_exit else 'exit'}")


def _forget_process(rec: AgentRecord) -> None:
    rec.pid = rec.pid_start_time = rec.started_at = None
    rec.started_monotonic = rec.heard_monotonic = None
