"""Operations the manager owns once it accepted them: a caller that leaves cannot cut them short."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import structlog

from opmasd.core.errors import Unavailable
from opmasd.core.tasks import TaskOwner

log = structlog.get_logger(__name__)


class _OwnsTasks(Protocol):
    _tasks: TaskOwner


Op = TypeVar("Op")


def finishes(method: Callable[..., Coroutine[Any, Any, Op]]) -> Callable[..., Coroutine[Any, Any, Op]]:
    """Once accepted, the operation runs to its end in a task the manager owns: the caller's
    cancellation (a client's deadline, a dropped connection, Ctrl-C) only stops the caller
    waiting, never a stop half-way through. Its result is in the agent's state and events."""

    @functools.wraps(method)
    async def run(self: _OwnsTasks, *args: Any, **kwargs: Any) -> Op:
        if self._tasks.closed:
            raise Unavailable("opmasd is shutting down")
        task = self._tasks.spawn(method(self, *args, **kwargs), method.__name__, awaited=True)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_report_unattended)
            raise

    return run


def _report_unattended(task: asyncio.Task[Any]) -> None:
    """The outcome of an operation whose caller left before it ended, for the log."""
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        log.info("operation finished after its caller left", operation=task.get_name())
    else:
        log.warning("operation failed after its caller left", operation=task.get_name(), error=str(error))
