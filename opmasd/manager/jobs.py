"""Periodic jobs: work the manager repeats on an interval, each in a task it owns, failures logged."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from opmasd.core.tasks import TaskOwner

log = structlog.get_logger(__name__)

Job = Callable[[], Awaitable[object]]


class PeriodicJobs:
    def __init__(self, tasks: TaskOwner) -> None:
        self._tasks = tasks

    def every(self, interval: float, job: Job, name: str) -> None:
        """Run job every interval seconds (first after one interval) until the owner stops.

        The interval is fixed when the job starts; a job that fails is logged and runs again
        at its next turn, so one bad pass does not end the loop.
        """
        self._tasks.spawn(self._loop(interval, job, name), name)

    @staticmethod
    async def _loop(interval: float, job: Job, name: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                log.exception("periodic job failed", job=name)
