"""The debug-only loop hang (opmasd/systemd/debug_hang.py) exists only when asked for."""

from __future__ import annotations

import signal
from typing import Any

from opmasd.systemd import debug_hang


class FakeLoop:
    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def add_signal_handler(self, sig: int, callback: Any) -> None:
        self.handlers[sig] = callback


def test_nothing_is_installed_without_the_variable() -> None:
    for env in ({}, {"OPMAS_DEBUG_HANG_SIGNAL": "0"}, {"OPMAS_DEBUG_HANG_SIGNAL": "yes"}):
        loop = FakeLoop()
        assert not debug_hang.install_debug_hang(loop, env)  # type: ignore[arg-type]
        assert loop.handlers == {}


def test_sigusr2_blocks_the_loop_when_asked_for(monkeypatch: Any) -> None:
    loop = FakeLoop()
    assert debug_hang.install_debug_hang(loop, {"OPMAS_DEBUG_HANG_SIGNAL": "1"})  # type: ignore[arg-type]
    slept: list[float] = []
    monkeypatch.setattr(debug_hang.time, "sleep", slept.append)
    loop.handlers[signal.SIGUSR2]()
    assert slept == [debug_hang.HANG_SECONDS]  # a blocking sleep on the loop, not an await
