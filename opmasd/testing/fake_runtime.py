"""An in-memory Runtime: processes are records, exits are what the test says they are.

Lets the manager's state machine, restart policy and reconciliation be tested in
milliseconds, with the same interface the process and systemd backends implement.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opmasd.core.errors import LaunchError
from opmasd.core.logs import LogEntry, LogStream
from opmasd.core.model import ExitInfo, ProcessHandle, ProcessUsage, ResourceLimits
from opmasd.runtime.base import ExitHandler, LaunchRequest


@dataclass
class FakeProcess:
    handle: ProcessHandle
    request: LaunchRequest
    # Whether SIGTERM ends it; when False, terminate waits the timeout and "kills" it.
    obeys_sigterm: bool = True
    lines: list[str] = field(default_factory=list)


class FakeRuntime:
    def __init__(self, first_pid: int = 1000) -> None:
        self._handler: ExitHandler | None = None
        self._pids = itertools.count(first_pid)
        self.processes: dict[str, FakeProcess] = {}
        # Processes that "survived" an earlier daemon: pid -> start_time.
        self.alive_elsewhere: dict[int, float] = {}
        # Processes an earlier daemon launched but never recorded, found by agent id.
        self.unrecorded: dict[str, ProcessHandle] = {}
        self.launches: list[LaunchRequest] = []
        self.fail_launch: dict[str, str] = {}
        self.ignore_sigterm: set[str] = set()
        self.terminations: list[tuple[str, float]] = []
        # begin_terminate calls: a bulk stop sends them all before any terminate.
        self.terminations_begun: list[str] = []
        # A plain string is a line of the agent's stdout.
        self.logs: dict[str, list[str | LogEntry]] = {}
        self.log_rotations = 0
        # The resource fields this runtime cannot enforce: field -> why (refusals()).
        self.unenforceable: dict[str, str] = {}

    def set_exit_handler(self, handler: ExitHandler) -> None:
        self._handler = handler

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        set_fields = {
            "resources.memory_max_bytes": resources.memory_max_bytes > 0,
            "resources.cpu_quota_percent": resources.cpu_quota_percent > 0,
            "resources.tasks_max": resources.tasks_max > 0,
            "resources.open_files_max": resources.open_files_max > 0,
        }
        return [(f, why) for f, why in self.unenforceable.items() if set_fields.get(f)]

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        self.launches.append(request)
        if request.agent_id in self.fail_launch:
            raise LaunchError(self.fail_launch[request.agent_id])
        handle = ProcessHandle(next(self._pids), 1_700_000_000.0)
        self.processes[request.agent_id] = FakeProcess(
            handle, request, obeys_sigterm=request.agent_id not in self.ignore_sigterm
        )
        return handle

    def crash(self, agent_id: str, exit_code: int | None = 1, signal: int | None = None) -> None:
        """The agent's process ends by itself."""
        proc = self.processes.pop(agent_id)
        assert self._handler is not None
        self._handler(agent_id, proc.handle, ExitInfo(exit_code, signal))

    def begin_terminate(self, agent_id: str) -> None:
        if agent_id in self.processes:
            self.terminations_begun.append(agent_id)

    async def terminate(self, agent_id: str, timeout: float) -> None:
        self.terminations.append((agent_id, timeout))
        proc = self.processes.pop(agent_id, None)
        if proc is None:
            return
        if not proc.obeys_sigterm:
            await asyncio.sleep(timeout)
        assert self._handler is not None
        self._handler(agent_id, proc.handle, ExitInfo(None, 15 if proc.obeys_sigterm else 9))

    def adopt(self, agent_id: str, handle: ProcessHandle | None) -> ProcessHandle | None:
        if handle is None:
            handle = self.unrecorded.pop(agent_id, None)
            if handle is None:
                return None
        elif self.alive_elsewhere.get(handle.pid) != handle.start_time:
            return None
        else:
            del self.alive_elsewhere[handle.pid]
        self.processes[agent_id] = FakeProcess(
            handle, LaunchRequest(agent_id, (), "/"), obeys_sigterm=agent_id not in self.ignore_sigterm
        )
        return handle

    async def reap_unmanaged(self) -> list[str]:
        reaped = [
            f"agent {agent_id}: killed pid {handle.pid}" for agent_id, handle in self.unrecorded.items()
        ]
        self.unrecorded.clear()
        return reaped

    def usage(self, agent_id: str) -> ProcessUsage | None:
        return ProcessUsage(1.0, 1024, 1, 3) if agent_id in self.processes else None

    async def tail_logs(self, agent_id: str, lines: int) -> list[LogEntry]:
        return [_entry(line) for line in self.logs.get(agent_id, [])[-lines:]]

    async def follow_logs(self, agent_id: str) -> AsyncIterator[LogEntry]:
        for line in self.logs.get(agent_id, []):
            yield _entry(line)

    async def rotate_logs(self) -> None:
        self.log_rotations += 1

    async def aclose(self) -> None:
        self.processes.clear()


def _entry(line: str | LogEntry) -> LogEntry:
    return line if isinstance(line, LogEntry) else LogEntry(line, LogStream.STDOUT)
