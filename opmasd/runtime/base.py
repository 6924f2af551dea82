"""The interface between the manager and a runtime backend.

The manager never knows which backend it talks to. A backend launches and stops agent
processes, tells the manager when one exits (at once, never by polling), re-attaches to
processes an earlier daemon left running, and serves their logs and resource usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from opmasd.core.logs import LogEntry as LogEntry  # what tail_logs and follow_logs return
from opmasd.core.model import ExitInfo, ProcessHandle, ProcessUsage, ResourceLimits
from opmasd.core.privileges import Sandbox


@dataclass(frozen=True)
class LaunchRequest:
    agent_id: str
    command: tuple[str, ...]
    working_directory: str
    # The complete environment of the agent process (the manager builds it).
    environment: Mapping[str, str] = field(default_factory=dict)
    resources: ResourceLimits = ResourceLimits()
    # Who the process runs as (a user name or uid, a group name or gid); "": opmasd's own.
    user: str = ""
    group: str = ""
    # The capabilities it keeps (CAP_* names) and its sandboxing, as the spec gives them.
    capabilities: tuple[str, ...] = ()
    sandbox: Sandbox = Sandbox()


# Called once per process exit, on the event loop: (agent_id, the process that ended, how).
ExitHandler = Callable[[str, ProcessHandle, ExitInfo], None]


class Runtime(Protocol):
    def set_exit_handler(self, handler: ExitHandler) -> None:
        """Where exits are reported. Set before the first launch or adopt."""

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        """What of `resources` this runtime cannot enforce, as (spec field, why) pairs; [] when
        it enforces them all. A limit is enforced or refused, never stored and ignored: the
        manager refuses such a spec, and launch raises LaunchError for one."""

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        """Start the agent's process. Raises LaunchError when it cannot be started."""

    async def terminate(self, agent_id: str, timeout: float) -> None:
        """Stop the agent's process and everything it started.

        SIGTERM to the whole process group, up to `timeout` seconds for it to go, then SIGKILL
        to the group. Returns once the process is gone; its exit is also reported through the
        exit handler. A no-op when the agent has no process.
        """

    def begin_terminate(self, agent_id: str) -> None:
        """The first signal of a terminate that follows, sent now (a bulk stop sends every
        agent's SIGTERM in one sweep, before any agent's bookkeeping, so that the processes
        end together). The terminate that follows does not send it again. A backend that
        cannot send it safely apart from terminate does nothing here."""

    def adopt(self, agent_id: str, handle: ProcessHandle | None) -> ProcessHandle | None:
        """Watch the agent's process that an earlier daemon started: the one `handle` names
        or, when none was recorded, the one the runtime can find by itself (its cgroup, its
        unit). Returns the process as it is now (its start time as this runtime reads it), or
        None (and nothing watched) when no such process is alive; what the agent's tree left
        behind is then killed."""

    async def reap_unmanaged(self) -> list[str]:
        """Kill processes that an earlier daemon launched for agents nobody adopted (deleted,
        or never recorded): called once every agent is recovered. One line per agent affected."""

    def usage(self, agent_id: str) -> ProcessUsage | None:
        """CPU, memory, threads and fds of the agent's process tree; None without a process."""

    async def tail_logs(self, agent_id: str, lines: int) -> list[LogEntry]:
        """The last `lines` lines of the agent's output."""

    def follow_logs(self, agent_id: str) -> AsyncIterator[LogEntry]:
        """New lines of the agent's output as they are written, until the caller stops."""

    async def rotate_logs(self) -> None:
        """Log housekeeping, every monitoring_interval (the manager calls it).

        A backend that caps its logs as they are written (the process runtime's log relay)
        uses it to check on its log writer; one without logs does nothing."""

    async def aclose(self) -> None:
        """Stop watching. Processes are left running (a later daemon re-adopts them)."""
