"""A debug-only way to hang opmasd's event loop, so that tests can watch systemd's watchdog act.

Only when the daemon starts with OPMAS_DEBUG_HANG_SIGNAL=1 in its environment (never set by the
shipped unit, the CLI or any configuration key) does SIGUSR2 block the event loop: the handler
runs on the loop and sleeps there, so the loop's WATCHDOG=1 pings stop, as they would if a bug
blocked it. systemd then kills opmasd with SIGABRT (Result=watchdog) and, per Restart=, starts it
again. Without the variable SIGUSR2 keeps its default action and nothing here is installed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping

import structlog

__all__ = ["HANG_SECONDS", "install_debug_hang"]

log = structlog.get_logger(__name__)

ENV_VAR = "OPMAS_DEBUG_HANG_SIGNAL"
# Longer than any WatchdogSec a test sets: the hang ends with the process, not by itself.
HANG_SECONDS = 3600.0


def install_debug_hang(loop: asyncio.AbstractEventLoop, env: Mapping[str, str] | None = None) -> bool:
    """Make SIGUSR2 hang the loop when env (default os.environ) asks for it; whether it did."""
    env = os.environ if env is None else env
    if env.get(ENV_VAR) != "1":
        return False
    log.warning("debug: SIGUSR2 will hang the event loop", variable=ENV_VAR)
    loop.add_signal_handler(signal.SIGUSR2, _hang)
    return True


def _hang() -> None:
    log.warning("debug: hanging the event loop on SIGUSR2", seconds=HANG_SECONDS)
    # Blocking on purpose: this is the hung loop the watchdog must catch.
    time.sleep(HANG_SECONDS)
