"""The D-Bus send window: calls in flight stay under it; one too big for it goes alone."""

from __future__ import annotations

import asyncio

from opmasd.runtime.dbus_window import SendWindow, approx_size


async def test_calls_wait_while_the_window_is_full_and_a_big_one_goes_alone() -> None:
    window = SendWindow(limit=10_000)
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("a", "b", "big")}

    async def call(name: str, size: int) -> None:
        async with window.hold(["x" * size]):
            order.append(f"{name} sent")
            await release[name].wait()
        order.append(f"{name} answered")

    tasks = [asyncio.create_task(call("a", 6_000)), asyncio.create_task(call("b", 6_000))]
    tasks.append(asyncio.create_task(call("big", 50_000)))
    await asyncio.sleep(0.01)
    assert order == ["a sent"]  # b does not fit beside a; big waits too
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order[:3] == ["a sent", "a answered", "b sent"]
    release["b"].set()
    await asyncio.sleep(0.01)
    assert order[-1] == "big sent" and window.used > window.limit  # alone, though larger
    release["big"].set()
    await asyncio.gather(*tasks)
    assert window.used == 0


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    window = SendWindow(limit=1_000)
    async with window.hold(["x" * 900]):
        waiting = asyncio.create_task(window.hold(["y" * 900]).__aenter__())
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    assert window.used == 0 and not window._waiters


def test_the_size_estimate_counts_strings_in_nested_bodies() -> None:
    assert approx_size(["abc", [("k", "v" * 100)], {"x": b"12"}]) > 100
