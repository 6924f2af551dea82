"""The run's shared state: options, the systems under test, the raw figures recorded so far."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import check_interrupted
from peers.base import Driver
from peers.circus import CircusDriver
from peers.opmasd import OpmasdDriver
from peers.supervisord import SupervisordDriver

SYSTEMS: dict[str, type[Driver]] = {
    "opmasd": OpmasdDriver,
    "supervisord": SupervisordDriver,
    "circus": CircusDriver,
}


@dataclass(frozen=True)
class Sizes:
    spawn: tuple[int, ...]
    fleets: tuple[int, ...]  # fleets kept up for the control-latency, list and footprint scenarios
    stop_all: tuple[int, ...]
    calls_per_round: int  # status calls per system per round (≥ 1000 in all)
    list_calls_per_round: int
    kills: int  # crash → restarted, per system
    start_stops: int  # start-then-stop checks, per system
    footprint_window: float  # seconds of idle CPU measured per round
    heartbeat_step: float  # seconds per heartbeat rate step
    heartbeat_rates: tuple[int, ...]
    systemd_units: int

    @staticmethod
    def for_run(full: bool, rounds: int) -> Sizes:
        if full:
            return Sizes(
                spawn=(100, 500, 1000),
                fleets=(10, 1000),
                stop_all=(200, 500),
                calls_per_round=max(1000, -(-2000 // rounds)),
                list_calls_per_round=50,
                kills=max(50, rounds * 10),
                start_stops=100,
                footprint_window=10.0,
                heartbeat_step=5.0,
                heartbeat_rates=(1000, 2000, 5000, 10000, 20000, 40000, 80000, 160000),
                systemd_units=100,
            )
        return Sizes(
            spawn=(100, 500),
            fleets=(10, 1000),
            stop_all=(200, 500),
            calls_per_round=max(200, -(-1000 // rounds)),
            list_calls_per_round=10,
            kills=max(20, rounds * 4),
            start_stops=20,
            footprint_window=5.0,
            heartbeat_step=2.0,
            heartbeat_rates=(2000, 5000, 10000, 20000, 40000, 80000),
            systemd_units=100,
        )


@dataclass
class Recorder:
    """Raw figures: scenario key → system → samples, plus notes (n/a reasons, settings)."""

    data: dict[str, Any] = field(default_factory=lambda: {"scenarios": {}, "notes": {}})

    def add(self, key: str, system: str, *values: float) -> None:
        self.data["scenarios"].setdefault(key, {}).setdefault(system, []).extend(values)

    def samples(self, key: str, system: str) -> list[float]:
        return list(self.data["scenarios"].get(key, {}).get(system, []))

    def note(self, key: str, text: str) -> None:
        self.data["notes"][key] = text


@dataclass
class Context:
    systems: list[str]
    rounds: int
    full: bool
    sizes: Sizes
    rec: Recorder
    nats_url: str = ""
    verbose: bool = True
    _live: list[Driver] = field(default_factory=list)

    def order(self, round_index: int) -> list[str]:
        """The systems in the order of this round: rotated by one each round."""
        check_interrupted()
        k = round_index % len(self.systems)
        return self.systems[k:] + self.systems[:k]

    def make(self, system: str) -> Driver:
        driver = OpmasdDriver(self.nats_url) if system == "opmasd" else SYSTEMS[system]()
        self._live.append(driver)
        return driver

    def close(self, driver: Driver) -> None:
        driver.close()
        with contextlib.suppress(ValueError):
            self._live.remove(driver)

    def close_all(self) -> None:
        for driver in list(self._live):
            self.close(driver)

    @contextlib.contextmanager
    def focus(self, driver: Driver, others: Sequence[Driver]) -> Iterator[None]:
        """Pause (SIGSTOP) the other daemons while driver is measured, so that their periodic
        work does not land on this one's figures; they continue (SIGCONT) afterwards."""
        paused = []
        for other in others:
            if other is not driver and other.popen is not None and other.popen.poll() is None:
                os.kill(other.popen.pid, signal.SIGSTOP)
                paused.append(other.popen.pid)
        try:
            yield
        finally:
            for pid in paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def say(self, text: str) -> None:
        check_interrupted()
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
