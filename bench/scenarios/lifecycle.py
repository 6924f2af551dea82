"""Scenarios that start and stop whole fleets: 1 (spawn) and 5 (stop all).

One system runs at a time here, so none competes with another for the CPU; the order of the
systems rotates every round.
"""

from __future__ import annotations

import time

from context import Context
from peers.base import SLEEP_WITH_CHILD, Driver, Fleet

SETTLE_BEFORE_SHUTDOWN = 1.0


def spawn(ctx: Context) -> None:
    """1. Cold start of N agents: from the daemon's exec until its API reports all N running."""
    ctx.rec.note(
        "1.spawn",
        "from the exec of the daemon until its API reports all N agents running (polled every 10 ms); "
        "the fleet is in opmasd's store with desired state running / in supervisord's and circus' "
        "config with autostart=true. Between rounds each daemon is shut down (opmasd, circus: SIGTERM, "
        "which stops their agents; supervisord: stopAllProcesses(wait) then SIGTERM)",
    )
    for n in ctx.sizes.spawn:
        key = f"1.spawn.N={n}"
        drivers: dict[str, Driver] = {}
        try:
            for system in ctx.systems:
                ctx.say(f"spawn N={n}: preparing {system}")
                drivers[system] = ctx.make(system)
                drivers[system].prepare(Fleet(n))
                api_spawn = getattr(drivers[system], "api_spawn_seconds", None)
                if api_spawn is not None:
                    ctx.rec.add(f"1b.api_spawn.N={n}", system, api_spawn)
            for r in range(ctx.rounds):
                for system in ctx.order(r):
                    driver = drivers[system]
                    seconds = driver.boot()
                    ctx.rec.add(key, system, seconds)
                    # Let every child exec before the shutdown: a stop landing between fork and
                    # exec is the start→stop check's business (and costs supervisord its whole
                    # stopwaitsecs per agent), not this scenario's.
                    time.sleep(SETTLE_BEFORE_SHUTDOWN)
                    ctx.rec.add(f"1.shutdown.N={n}", system, driver.stop())
                    ctx.say(f"spawn N={n} round {r + 1}: {system} {seconds * 1000:.0f} ms")
        finally:
            for driver in drivers.values():
                ctx.close(driver)


def stop_all(ctx: Context) -> None:
    """5. Stop all N agents (each with a child) through the API; until every process is gone."""
    for n in ctx.sizes.stop_all:
        _stop_all(ctx, n)


def _stop_all(ctx: Context, n: int) -> None:
    ctx.rec.note(
        "5.stop_all",
        f"N={n} agents, each `sh -c 'sleep & exec sleep'` (2 processes); opmasd: one StopAgents(all) "
        "call, supervisord: stopAllProcesses(wait), circus: stop (all watchers, waiting); every process "
        "is watched through a pidfd: 'all gone' is the last exit, 'per process' each one's exit after the "
        "request; processes alive 5 s after the API reported all stopped count as left",
    )
    drivers: dict[str, Driver] = {}
    try:
        for system in ctx.systems:
            ctx.say(f"stop all N={n}: preparing {system}")
            drivers[system] = ctx.make(system)
            drivers[system].prepare(Fleet(n, command=list(SLEEP_WITH_CHILD)))
        for r in range(ctx.rounds):
            for system in ctx.order(r):
                driver = drivers[system]
                driver.boot()
                result = driver.stop_all(linger=5.0)
                driver.stop()
                ctx.rec.add(f"5.stop_all.N={n}", system, result.gone_seconds)
                ctx.rec.add(f"5.stop_all_api.N={n}", system, result.api_seconds)
                ctx.rec.add(f"5.stop_all_per_process.N={n}", system, *result.per_process)
                ctx.rec.add(f"5.stop_all_left.N={n}", system, result.left)
                ctx.say(
                    f"stop all N={n} round {r + 1}: {system} all gone in {result.gone_seconds * 1000:.0f} ms "
                    f"({result.processes} processes, API returned after {result.api_seconds * 1000:.0f} ms"
                    f"{f', {result.left} LEFT' if result.left else ''})"
                )
    finally:
        for driver in drivers.values():
            ctx.close(driver)
