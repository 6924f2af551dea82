"""The process backend: every agent is a child process leading its own process group.

Exits are noticed through a pidfd registered with the event loop (readable the moment the
process ends), not by polling and not through asyncio's child watchers. The same mechanism
watches processes adopted from an earlier daemon, which are not our children: for those the
kernel tells us that they ended but not how.

Output goes through pipes to the log relay (logrelay.py, a process of its own that writes the
per-agent log files, read back by logfiles.AgentLogs), so agents and their output outlive the
daemon, and a restarted daemon adopts them again.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psutil
import structlog

from opmasd.core.errors import LaunchError
from opmasd.core.logs import LogEntry
from opmasd.core.model import ExitInfo, ProcessHandle, ProcessUsage, ResourceLimits
from opmasd.core.tasks import event_within
from opmasd.runtime import procstat, signals
from opmasd.runtime.base import ExitHandler, LaunchRequest
from opmasd.runtime.cgroup_limits import CgroupLimits
from opmasd.runtime.cgroup_trees import EMPTY_WAIT, CgroupTrees
from opmasd.runtime.cgroups import AgentCgroups, joining_command
from opmasd.runtime.identity import as_identity, check_group, privilege_options
from opmasd.runtime.logfiles import AgentLogs
from opmasd.runtime.logrelay_link import RelayLink
from opmasd.runtime.process_scopes import ProcessScopes
from opmasd.runtime.proctable import ProcessTable
from opmasd.runtime.programs import check_program, not_executable, not_found
from opmasd.runtime.scope_cgroups import Gate
from opmasd.runtime.watched import WatchedProcess, reap, same_process, start_time_of

log = structlog.get_logger(__name__)

# After SIGKILL the leader goes at once unless stuck in the kernel; say so at this interval.
_SIGKILL_WARN_INTERVAL = 5.0


class ProcessRuntime:
    """The Runtime protocol over plain child processes. Use it from the event loop's thread."""

    def __init__(
        self,
        log_dir: Path,
        *,
        log_max_bytes: int = 10 * 1024 * 1024,
        log_backups: int = 3,
        cgroups: AgentCgroups | None = None,
        child_open_files: int | None = None,
        scopes: ProcessScopes | None = None,
    ) -> None:
        # The soft open-files limit agents start with (None: the daemon's own).
        self._child_open_files = child_open_files
        # With cgroups an agent's tree is its cgroup's members; without, its process group
        # plus what a /proc scan finds (which misses a double fork once its parent is gone).
        # With scopes (runtime.process_scopes) it is the agent's scope's cgroup, limited by systemd.
        self._scopes = scopes
        base = None if cgroups is None else cgroups.base
        self._limits = CgroupLimits(base, "opmasd keeps no cgroup per agent here (agents.cgroups)")
        if scopes is not None:
            cgroups, self._limits = scopes.cgroups, scopes.limits
        self._trees = None if cgroups is None else CgroupTrees(cgroups)
        self._finishing: set[asyncio.Task[None]] = set()
        self._logs = AgentLogs(log_dir, max_bytes=log_max_bytes, backups=log_backups)
        self._relay = RelayLink(log_dir, max_bytes=log_max_bytes, backups=log_backups)
        self._relay.on_start = None if scopes is None else scopes.relay_started
        self._watched: dict[str, WatchedProcess] = {}
        self._exit_handler: ExitHandler | None = None
        self._closed = False
        self._processes = ProcessTable()

    def set_exit_handler(self, handler: ExitHandler) -> None:
        self._exit_handler = handler

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        return self._limits.refusals(resources)

    # --- starting and watching --------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        agent_id = request.agent_id
        if self._closed:
            raise LaunchError("the process runtime is closed")
        if agent_id in self._watched:
            raise LaunchError(
                f"agent {agent_id} already has a process (pid {self._watched[agent_id].handle.pid})"
            )
        if not request.command:
            raise LaunchError(f"agent {agent_id} has an empty command")
        refused = self._limits.refusals(request.resources)
        if refused:  # registered where they could be, or before this check: never run unlimited
            raise LaunchError("; ".join(f"{field}: {why}" for field, why in refused))
        if request.group:
            check_group(request.group)
        options = privilege_options(request)
        spawned = replace(request, command=as_identity(request.user, request.group, request.command, options))
        # Checked here when the program is not what Popen starts (cgroup join, scope gate, setpriv).
        if self._trees is not None or self._scopes is not None or spawned.command != request.command:
            check_program(request.command, request.working_directory or None, request.environment)
        gate = None
        if self._scopes is not None:  # the program waits at the gate until it is in its scope
            spawned, gate = self._scopes.gated(spawned)
        elif self._trees is not None:
            try:
                procs_file = self._trees.cgroups.prepare(agent_id)
                self._limits.apply(procs_file.parent, request.resources)
            except OSError as exc:
                raise LaunchError(
                    f"cannot create the cgroup of agent {agent_id}: {exc.strerror or exc}"
                ) from exc
            spawned = replace(spawned, command=joining_command(procs_file, spawned.command))
        # Spawning is synchronous on purpose: fork/exec takes about a millisecond. From here to
        # _watch nothing awaits but the placement, whose agent no sweep takes for unmanaged.
        try:
            popen = self._spawn(spawned, gate)
        except LaunchError:
            if gate is not None:
                gate.close()
            raise
        if gate is not None and self._scopes is not None:
            await self._scopes.place(agent_id, popen, gate, self._relay.note)
            if self._closed:  # it runs, in its scope: the next daemon finds it there (adopt)
                raise LaunchError("the process runtime closed while the agent was launched")
        handle = ProcessHandle(popen.pid, start_time_of(popen.pid, agent_id))
        try:
            # Cannot fail for lack of the process: an unreaped child (even dead) keeps its PID.
            pidfd = os.pidfd_open(popen.pid)
        except OSError as exc:
            log.error("pidfd_open failed, killing the new process", agent_id=agent_id, error=str(exc))
            signals.kill_group(popen.pid)
            popen.wait()
            raise LaunchError(f"cannot watch the process of agent {agent_id}: {exc}") from exc
        _apply_limits(agent_id, popen.pid, request.resources, self._child_open_files)
        self._watch(WatchedProcess(agent_id, handle, pidfd, popen))
        log.info("agent launched", agent_id=agent_id, pid=popen.pid, command=request.command)
        return handle

    def _spawn(self, request: LaunchRequest, gate: Gate | None = None) -> subprocess.Popen[bytes]:
        """Start the process: stdout and stderr are pipes to the log relay, stdin the gate if any."""
        agent_id = request.agent_id
        cwd = request.working_directory or None
        if cwd is not None and not os.path.isdir(cwd):
            raise LaunchError(f"working directory {cwd!r} does not exist or is not a directory")
        try:
            self._logs.path(agent_id)
            pipes = self._relay.pipes()
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot make the output pipes of agent {agent_id}: {exc}") from exc
        try:
            # A session of its own makes the agent a process-group leader, so the whole tree
            # can be signalled at once. No preexec_fn: it would force a plain fork, running
            # gRPC's fork handlers. The pipes' write ends are the child's stdout and stderr.
            popen = subprocess.Popen(
                list(request.command),
                cwd=cwd,
                env=dict(request.environment),
                stdin=subprocess.DEVNULL if gate is None else gate.read,
                stdout=pipes.out_write,
                stderr=pipes.err_write,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError) as exc:
            pipes.close()
            message = _launch_failure(request.command[0], exc)
            self._relay.note(agent_id, f"failed to start: {message}")
            log.warning("agent launch failed", agent_id=agent_id, command=request.command, error=message)
            raise LaunchError(message) from exc
        # The child has its own write ends; the read ends go to the relay (and a spare stays here).
        pipes.close_write_ends()
        self._relay.attach(agent_id, pipes, f"started pid {popen.pid} at {_now_iso()}")
        return popen

    def adopt(self, agent_id: str, handle: ProcessHandle | None) -> ProcessHandle | None:
        existing = self._watched.get(agent_id)
        if existing is not None:
            # While watched its PID cannot be reused: the same PID is the same process.
            same = handle is None or existing.handle.pid == handle.pid
            log.info("adopt: agent already watched", agent_id=agent_id, pid=existing.handle.pid, same=same)
            return existing.handle if same else None
        if self._closed:
            log.warning("adopt: the process runtime is closed", agent_id=agent_id)
            return None
        if handle is None:
            # No PID was recorded (a daemon killed between spawn and commit): the agent's
            # cgroup still knows its process.
            found = None if self._trees is None else self._trees.leader(agent_id)
            if found is None:
                return None
            handle = ProcessHandle(found.pid, found.start_time)
            log.warning(
                "found an agent process whose launch was not recorded", agent_id=agent_id, pid=found.pid
            )
        adopted = self._watch_adopted(agent_id, handle)
        if adopted is None and self._trees is not None:
            self._trees.kill_orphans(agent_id)
        return adopted

    def _watch_adopted(self, agent_id: str, handle: ProcessHandle) -> ProcessHandle | None:
        try:
            pidfd = os.pidfd_open(handle.pid)
        except OSError as exc:  # ProcessLookupError when the PID is free
            log.info("not adopting: process gone", agent_id=agent_id, pid=handle.pid, error=str(exc))
            return None
        # Opened first, checked second: if the PID was reused before the open, the start time
        # read now is the new process's, and the pidfd is dropped with it.
        stat = procstat.read(handle.pid)
        if stat is None or stat.zombie:
            # A process that ended but was not reaped (its new parent, PID 1 in a container,
            # may never reap) still has its PID: it is gone all the same, not to be adopted.
            os.close(pidfd)
            log.info("not adopting: process has ended", agent_id=agent_id, pid=handle.pid)
            return None
        if not same_process(handle, stat):
            os.close(pidfd)
            log.info(
                "not adopting: PID belongs to another process",
                agent_id=agent_id,
                pid=handle.pid,
                expected_start=handle.start_time,
                actual_start=stat.start_time,
            )
            return None
        current = ProcessHandle(handle.pid, stat.start_time)
        self._watch(WatchedProcess(agent_id, current, pidfd, popen=None))
        log.info("agent process adopted", agent_id=agent_id, pid=handle.pid)
        return current

    async def reap_unmanaged(self) -> list[str]:
        return [] if self._trees is None else await self._trees.reap_unmanaged(self._watched)

    def _watch(self, watched: WatchedProcess) -> None:
        self._watched[watched.agent_id] = watched
        asyncio.get_running_loop().add_reader(watched.pidfd, self._on_exit, watched)

    def _on_exit(self, watched: WatchedProcess) -> None:
        """The pidfd became readable: the process has ended. Runs on the loop, once."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(watched.pidfd)
        pid = watched.handle.pid
        if self._trees is None:
            # Orphans of the agent must not linger. Our own child is still an unreaped zombie
            # here, which keeps its PID (and so its group ID) from being reused: sweep the group
            # before reaping. An adopted process may be reaped already, but its group ID stays
            # reserved while any member is left; when none is, the signal finds nobody.
            signals.kill_group(pid)
        info = reap(watched)
        os.close(watched.pidfd)
        watched.leader_gone = True
        if self._trees is None:
            self._report_exit(watched, info)
            return
        # Still watched until the cgroup is empty: no new process of the agent may join it
        # while what the old one left is being killed.
        clear = self._clear_cgroup(watched, info, self._trees)
        task = loop.create_task(clear, name=f"cgroup-clear:{watched.agent_id}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _clear_cgroup(self, watched: WatchedProcess, info: ExitInfo, trees: CgroupTrees) -> None:
        """After the leader: the exit is reported once the cgroup is verified empty."""
        try:
            killed = await trees.clear_after_exit(watched.agent_id, watched.grace_until)
        except asyncio.CancelledError:
            watched.gone.set()  # the runtime is closing; terminate() sees no exit and raises
            raise
        self._report_exit(watched, replace(info, leftovers=killed) if killed else info)

    def _report_exit(self, watched: WatchedProcess, info: ExitInfo) -> None:
        pid = watched.handle.pid
        watched.exit = info
        if self._watched.get(watched.agent_id) is watched:
            del self._watched[watched.agent_id]
        watched.gone.set()
        log.info("agent process exited", agent_id=watched.agent_id, pid=pid, reason=info.reason)
        self._relay.note(watched.agent_id, f"pid {pid} {info.reason} at {_now_iso()}")
        if self._exit_handler is None:
            log.warning("no exit handler set; exit not reported", agent_id=watched.agent_id, pid=pid)
            return
        try:
            self._exit_handler(watched.agent_id, watched.handle, info)
        except Exception:
            log.exception("exit handler failed", agent_id=watched.agent_id, pid=pid)

    # --- stopping ---------------------------------------------------------------------------

    def begin_terminate(self, agent_id: str) -> None:
        # Only with the agent's cgroup: without it, terminate must find the descendants before
        # the first signal (see there), a /proc sweep that has no place in a sweep of signals.
        watched = self._watched.get(agent_id)
        if watched is not None and self._trees is not None and not watched.term_sent:
            watched.term_sent = watched.signal_group(signal.SIGTERM)

    async def terminate(self, agent_id: str, timeout: float) -> None:
        watched = self._watched.get(agent_id)
        if watched is None:
            return
        if self._trees is not None:
            await self._terminate_tree(watched, self._trees, timeout)
            return
        pid = watched.handle.pid
        # Descendants are found now, while the tree is intact: one that left the group (setsid)
        # is out of killpg's reach, and once its parent dies it is no longer findable as ours.
        family = self._processes.descendants(pid)
        log.info("terminating agent process", agent_id=agent_id, pid=pid, timeout=timeout)
        watched.signal_tree(signal.SIGTERM, family)
        if not await event_within(watched.gone, timeout):
            family = _merge(family, self._processes.descendants(pid, fresh=True))
            log.warning(
                "agent process still alive after SIGTERM; sending SIGKILL", agent_id=agent_id, pid=pid
            )
            watched.signal_tree(signal.SIGKILL, family)
            while not await event_within(watched.gone, _SIGKILL_WARN_INTERVAL):
                log.error("agent process still alive after SIGKILL", agent_id=agent_id, pid=pid)
        if watched.exit is None:
            raise RuntimeError(f"the process runtime was closed before agent {agent_id} exited")
        await signals.kill_stragglers(agent_id, family, pid)

    async def _terminate_tree(self, watched: WatchedProcess, trees: CgroupTrees, timeout: float) -> None:
        """SIGTERM once to every member of the agent's cgroup, SIGKILL to all after `timeout`;
        done when the cgroup is empty (the exit is reported only then)."""
        agent_id, pid = watched.agent_id, watched.handle.pid
        watched.grace_until = asyncio.get_running_loop().time() + max(timeout, 0.0)
        # The group first (unless begin_terminate sent it), then a yield: in a burst of stops (a
        # shutdown) every agent's group has its SIGTERM before any of the rest is done, so all
        # the processes end together instead of one after another's bookkeeping. The cgroup
        # holds the tree meanwhile: what left the group is found there afterwards, and
        # signalled then. (One forked into the group during the yield misses this SIGTERM; the
        # cgroup's kill at the deadline still reaches it.)
        group_signalled = watched.term_sent or watched.signal_group(signal.SIGTERM)
        await asyncio.sleep(0)
        family = trees.family(agent_id, pid)
        log.info(
            "terminating agent process (SIGTERM sent)",
            agent_id=agent_id,
            pid=pid,
            timeout=timeout,
            tree=len(family) + 1,
        )
        if group_signalled:
            signals.signal_escaped(pid, signal.SIGTERM, family)
        else:
            watched.signal_tree(signal.SIGTERM, family)
        if not await event_within(watched.gone, timeout):
            log.warning("agent still alive after SIGTERM; killing its cgroup", agent_id=agent_id, pid=pid)
            trees.cgroups.kill(agent_id)
            while not await event_within(watched.gone, _SIGKILL_WARN_INTERVAL):
                log.error("agent process still alive after SIGKILL", agent_id=agent_id, pid=pid)
        if watched.exit is None:
            raise RuntimeError(f"the process runtime was closed before agent {agent_id} exited")

    # --- observing --------------------------------------------------------------------------

    def usage(self, agent_id: str) -> ProcessUsage | None:
        watched = self._watched.get(agent_id)
        if watched is None:
            return None
        return watched.usage.sample()

    async def tail_logs(self, agent_id: str, lines: int) -> list[LogEntry]:
        await self._relay.sync(agent_id)  # what the agent wrote until now is in the file
        return await asyncio.to_thread(self._logs.tail, agent_id, lines)

    def follow_logs(self, agent_id: str) -> AsyncIterator[LogEntry]:
        return self._logs.follow(agent_id)

    async def rotate_logs(self) -> None:
        """The relay caps the logs as it writes; this only reconnects to it (or restarts it)."""
        self._relay.check()

    async def aclose(self) -> None:
        """Stop watching; the processes keep running for a later daemon to adopt.

        Our children's Popen objects are dropped: the standard library keeps the ones still
        running in its own list and reaps them if they end while this process lives on.
        """
        self._closed = True
        if self._finishing:
            # Exits whose leftovers are being killed: let them finish briefly (a later daemon
            # sweeps whatever is still left: reap_unmanaged).
            _done, pending = await asyncio.wait(set(self._finishing), timeout=EMPTY_WAIT)
            for task in pending:
                task.cancel()
        loop = asyncio.get_running_loop()
        for watched in self._watched.values():
            if not watched.leader_gone:
                loop.remove_reader(watched.pidfd)
                os.close(watched.pidfd)
            watched.gone.set()  # wakes terminate() calls in progress; they see no exit and raise
        if self._trees is not None:
            self._trees.cgroups.close()
        self._relay.close()
        if self._scopes is not None:
            await self._scopes.close()
        log.info("process runtime closed", left_running=sorted(self._watched))
        self._watched.clear()


# --- helpers -------------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _launch_failure(program: str, exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return not_found(program)
    if isinstance(exc, PermissionError):
        return not_executable(program)
    if isinstance(exc, OSError):
        return f"cannot start program {program!r}: {exc.strerror or exc}"
    return f"cannot start program {program!r}: {exc}"


def _apply_limits(agent_id: str, pid: int, resources: ResourceLimits, default_soft: int | None) -> None:
    """Only the open-files limit is enforceable per process; the rest is the systemd backend's.

    Without one in the spec the agent gets default_soft as its soft limit (runtime.fdlimit).
    """
    if resources.open_files_max > 0:
        limits = (resources.open_files_max, resources.open_files_max)
    elif default_soft is not None:
        limits = (default_soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    else:
        return
    limit = limits[0]
    try:
        psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE, limits)
    except (psutil.Error, OSError, ValueError) as exc:
        log.warning(
            "cannot set the open-files limit", agent_id=agent_id, pid=pid, limit=limit, error=str(exc)
        )


def _merge(first: list[psutil.Process], second: list[psutil.Process]) -> list[psutil.Process]:
    return first + [proc for proc in second if proc not in first]
