"""Background tasks with an owner: whoever spawns them cancels and awaits them on stop.

The manager's timers and loops live as long as the manager, not as long as one request, so an
asyncio.TaskGroup scoped to a single `async with` does not fit; this keeps the same promise
(no fire-and-forget task, every failure logged) for tasks of a component's lifetime.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class TaskOwner:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, awaited: bool = False) -> asyncio.Task[Any]:
        """Run coro in a task of this owner. awaited: someone awaits its result and gets its
        error, so a failure is not logged as a background task's."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._name} is stopped; cannot start {name}")
        task = asyncio.create_task(coro, name=f"{self._name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._forget if awaited else self._finished)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", task=task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every task and wait for all of them to end."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def event_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` is set within `seconds` (0 or less: whether it is set now, after a turn)."""
    try:
        await asyncio.wait_for(event.wait(), max(seconds, 0.0))
    except TimeoutError:
        return False
    return True
