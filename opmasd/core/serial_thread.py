"""SerialThread: blocking calls run one after another on a thread of their own, awaited from asyncio.

The store's calls block (a database that is slow, frozen or gone away), and the event loop must
never wait on them: supervision, heartbeats, the watchdog and every read served from memory go
on while a call is stuck. One thread, not a pool, because store writes must land in the order
they were made and the store serialises its calls anyway.

A daemon thread of our own rather than a ThreadPoolExecutor: the executor's threads are joined
when the interpreter exits, so a call stuck on a frozen database would keep opmasd from exiting.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A call, what it does (for logs), its future and the loop that awaits it.
_Job = tuple[Callable[[], Any], str, asyncio.Future[Any], asyncio.AbstractEventLoop]


class SerialThread:
    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The call running now (for "what is stuck" in logs), or "".
        self.current = ""

    async def run(self, call: Callable[[], T], what: str = "") -> T:
        """Run call on the thread, after every call handed over before it; its result or error.

        Cancelling the awaiting task stops the waiting, not the call: it runs to its end on the
        thread (a half-made database call cannot be taken back).
        """
        return await self.submit(call, what)

    def submit(self, call: Callable[[], T], what: str = "") -> asyncio.Future[T]:
        """Hand call over; the future of its outcome (a plain future, not a task: cancelling
        every task, as a closing loop does, leaves it alone)."""
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((call, what, future, loop))
        return future

    def close(self) -> None:
        """No more calls; the thread ends after the ones already handed over (it is a daemon
        thread, so one stuck forever does not keep the process alive)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            call, what, future, loop = job
            self.current = what
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting task, which decides
                _deliver(loop, future, None, exc)
            else:
                _deliver(loop, future, result, None)
            finally:
                self.current = ""


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    def settle() -> None:
        if future.done():  # the waiter was cancelled: the outcome is the log's
            if error is not None:
                log.warning("a call failed after its caller stopped waiting", error=repr(error))
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        # The loop is closed (the daemon is exiting): nobody is left to tell but the log.
        if error is not None:
            log.warning("a call failed after its event loop closed", error=repr(error))
