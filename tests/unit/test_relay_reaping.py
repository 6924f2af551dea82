"""A log relay that closed its socket before exiting is reaped once it has exited, not left a
zombie of opmasd when a new relay takes its place (seen under load in the e2e suite)."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any, cast

from opmasd.runtime.logrelay_link import _reap_soon


class ExitingRelay:
    """A Popen whose process exits after `running` more polls."""

    def __init__(self, running: int) -> None:
        self.running = running
        self.polls = 0

    def poll(self) -> int | None:
        self.polls += 1
        if self.running > 0:
            self.running -= 1
            return None
        return 0


async def test_an_exiting_relay_is_polled_until_reaped_then_left_alone() -> None:
    relay = ExitingRelay(running=2)
    _reap_soon(cast(subprocess.Popen[bytes], relay), asyncio.get_running_loop())
    await asyncio.sleep(0.5)
    assert relay.polls == 3 and relay.running == 0  # reaped on the third poll, then no more


async def test_a_relay_that_never_exits_is_polled_a_bounded_number_of_times() -> None:
    relay: Any = ExitingRelay(running=10**6)
    _reap_soon(relay, asyncio.get_running_loop(), tries=3)
    await asyncio.sleep(0.6)
    assert relay.polls == 4
