"""Heartbeat judging: running ↔ inactive from the agents' heartbeats, and when not to judge.

Taking a heartbeat is a dictionary update in memory; the last-seen times reach the store
through the write-behind persistence in batches, once per flush interval.

Each agent is judged on its own deadline: three of its heartbeat intervals (MISSED_HEARTBEATS),
or the global heartbeat_timeout for an agent that declares no interval.

A NATS outage silences every agent at once; that says nothing about them, so while the bus is
down nobody is judged, and after it is back every agent gets its full deadline to be heard
again before it is marked inactive (and, with restart_on_inactive, restarted). A daemon
that has just started is in the same position (it was down, and heard nobody meanwhile): agents
it re-adopted get the same grace, instead of being judged on heartbeats stored before it died.

An agent is watched for a lost heartbeat only once it has sent one since its process started:
an agent that speaks the NATS contract has proved it, while a plain program that never will
(a shell loop, a binary from elsewhere) is not marked inactive for staying silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from opmasd.core.clock import SYSTEM_CLOCK, Clock
from opmasd.core.messages import Heartbeat
from opmasd.core.model import AgentRecord, AgentState
from opmasd.manager.persistence import WriteBehind
from opmasd.manager.registry import AgentRegistry

log = structlog.get_logger(__name__)


# An agent that declares its heartbeat interval is inactive after missing this many in a row.
MISSED_HEARTBEATS = 3


@dataclass(frozen=True)
class HealthSettings:
    # For agents that declare no heartbeat_interval (0): silence allowed before inactive.
    heartbeat_timeout: float = 90.0


class HeartbeatJudge:
    def __init__(
        self,
        registry: AgentRegistry,
        writes: WriteBehind,
        settings: HealthSettings,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._registry = registry
        self._writes = writes
        self._clock = clock
        # Public: a configuration reload (SIGHUP) replaces it.
        self.settings = settings
        # Down until the first check that finds the bus connected (see the module docstring);
        # silence before _heard_from (when it was last found connected again) is not counted.
        self._bus_was_down = True
        self._heard_from = float("-inf")
        # Counters for the stats (manager.stats), one int increment each on this hot path:
        # every heartbeat taken, those from unknown agents, agents marked inactive for silence.
        # Called for a heartbeat from an agent still in its start window (the supervisor's).
        self.on_starting_heartbeat: Callable[[AgentRecord], None] = lambda rec: None
        self.heartbeats_received = 0
        self.heartbeats_unknown = 0
        self.heartbeats_late = 0

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.heartbeats_received += 1
        rec = self._registry.get(heartbeat.agent_id)
        if rec is None:
            self.heartbeats_unknown += 1
            if self.heartbeats_unknown in (1, 100, 10_000) or self.heartbeats_unknown % 100_000 == 0:
                log.warning(
                    "heartbeat from an unknown agent",
                    agent_id=heartbeat.agent_id,
                    total=self.heartbeats_unknown,
                )
            return
        # Our clock, not the agent's: liveness must not depend on the agents' clocks being right.
        now = self._clock.now()
        rec.last_heartbeat = now
        rec.heard_monotonic = self._clock.monotonic()
        self._writes.note_heartbeat(rec.agent_id, now)
        if rec.state is AgentState.INACTIVE:
            self._registry.transition(rec, AgentState.RUNNING, "heartbeat received again")
        elif rec.state is AgentState.STARTING:
            self.on_starting_heartbeat(rec)

    def deadline(self, rec: AgentRecord) -> float:
        """Seconds of silence after which rec is inactive: its own interval's worth of missed
        heartbeats, or the global heartbeat_timeout for an agent that declares no interval."""
        interval = rec.spec.heartbeat_interval
        return MISSED_HEARTBEATS * interval if interval > 0 else self.settings.heartbeat_timeout

    def mark_silent_inactive(self, bus_connected: bool = True) -> list[AgentRecord]:
        """Move running agents whose heartbeat stopped to inactive; returns the ones moved."""
        now = self._clock.monotonic()
        if not bus_connected:
            if not self._bus_was_down:
                log.warning("NATS is down: heartbeat loss is not judged until it is back")
            self._bus_was_down = True
            return []
        if self._bus_was_down:
            self._bus_was_down = False
            self._heard_from = now
            log.info("NATS connected: each agent has its heartbeat deadline to be heard")
        gone: list[AgentRecord] = []
        for rec in list(self._registry.live()):
            if rec.state is not AgentState.RUNNING or rec.pid is None:
                continue
            heard, started = rec.heard_monotonic, rec.started_monotonic
            if heard is None or started is None or heard < started:
                continue  # no heartbeat from this process yet: not a NATS agent, or still starting
            silent = now - heard
            # Silence while the bus was down (or this daemon was) says nothing about the agent.
            judged = now - max(heard, self._heard_from)
            if judged > self.deadline(rec):
                last = rec.last_heartbeat
                at = f" (last at {last.isoformat(timespec='seconds')})" if last is not None else ""
                reason = f"no heartbeat for {silent:.0f}s{at}"
                self._registry.transition(rec, AgentState.INACTIVE, reason)
                gone.append(rec)
        self.heartbeats_late += len(gone)
        return gone
