"""Sampling the CPU, memory, threads and open files of one agent's process tree."""

from __future__ import annotations

import psutil
import structlog

from opmasd.core.model import ProcessUsage

log = structlog.get_logger(__name__)


class UsageSampler:
    """Samples the tree under one leader process, for as long as that process is watched.

    The psutil objects are kept from one sample to the next because cpu_percent measures the
    CPU used since the previous call on the same object.
    """

    def __init__(self, agent_id: str, pid: int) -> None:
        self._agent_id = agent_id
        self._pid = pid
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> ProcessUsage | None:
        """The tree's usage now; None when the leader is gone."""
        cache = self._procs
        pid = self._pid
        try:
            leader = cache.get(pid) or psutil.Process(pid)
            children = leader.children(recursive=True)
        except psutil.NoSuchProcess:  # gone, or a zombie about to be reported
            return None
        current = {pid: leader}
        for child in children:
            cached = cache.get(child.pid)
            # psutil compares PID and start time: a reused PID gets a fresh object.
            current[child.pid] = cached if cached is not None and cached == child else child
        self._procs = current
        cpu, rss, threads, fds = 0.0, 0, 0, 0
        for proc in current.values():
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(interval=None)
                    rss += proc.memory_info().rss
                    threads += proc.num_threads()
                    fds += proc.num_fds()
            except psutil.NoSuchProcess:
                continue  # ended between the listing and now
            except psutil.AccessDenied as exc:
                log.debug(
                    "usage: process not readable", agent_id=self._agent_id, pid=proc.pid, error=str(exc)
                )
        return ProcessUsage(cpu_percent=cpu, rss_bytes=rss, num_threads=threads, open_fds=fds)
