"""Log tails held by the API share one budget (api.tail_budget): a tail that does not fit waits
for another to end, and is refused after a while; reads of tails are few at once."""

from __future__ import annotations

import asyncio

import pytest

from opmasd.api.tail_budget import LINE_OVERHEAD, TailBudget
from opmasd.core.errors import Unavailable
from opmasd.core.logs import LogEntry
from opmasd.manager.log_tail import MAX_TAIL_BYTES, within_bytes


def lines(n: int, size: int = 100) -> list[LogEntry]:
    return [LogEntry(text="x" * size) for _ in range(n)]


async def test_tails_beyond_the_budget_wait_for_one_to_end_and_are_refused_after_a_while() -> None:
    one = 10 * (100 + LINE_OVERHEAD)
    budget = TailBudget(total_bytes=2 * one, wait=0.2)

    async def read() -> list[LogEntry]:
        return lines(10)

    async with budget.tail(read), budget.tail(read):
        assert budget.held == 2 * one
        with pytest.raises(Unavailable, match="too many log tails"):
            async with budget.tail(read):
                pass
    assert budget.held == 0
    # One that waits gets in as soon as another ends.
    release = asyncio.Event()

    async def hold() -> None:
        async with budget.tail(read), budget.tail(read):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(budget.tail(read).__aenter__())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    assert await asyncio.wait_for(waiting, 1) == lines(10)
    await holder


async def test_reads_of_tails_are_few_at_once() -> None:
    budget = TailBudget(readers=2)
    running = 0
    most = 0

    async def read() -> list[LogEntry]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1
        return []

    async def one() -> None:
        async with budget.tail(read):
            pass

    await asyncio.gather(*(one() for _ in range(8)))
    assert most == 2


def test_a_tail_keeps_its_newest_lines_within_the_byte_bound() -> None:
    entries = [LogEntry(text=f"{i:08d}" + "y" * 1000) for i in range(20_000)]  # ~20 MB
    kept = within_bytes(entries)
    assert sum(len(e.text) for e in kept) <= MAX_TAIL_BYTES
    assert kept[-1] is entries[-1] and len(kept) < len(entries)
    assert within_bytes(entries[:5]) == entries[:5]
