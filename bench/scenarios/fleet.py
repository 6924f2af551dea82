"""Scenarios on a standing fleet: 2 (status latency), 3 (list), 4 (crash → restarted),
the start-then-stop stall check, 7 (footprint) and 8 (REST vs gRPC).

Every system's fleet is up at once; each round visits the systems in rotating order, and while
one is measured the other daemons are paused (SIGSTOP), so their periodic work does not land on
its figures. Footprint is measured for all at once (each daemon's own RSS and CPU time).
"""

from __future__ import annotations

import time

from common import check_interrupted
from context import Context
from peers.base import Driver, Fleet
from peers.opmasd import OpmasdDriver

STALL_AGENT = "stall"
STALL_TIMEOUT = 1.0  # the stop timeout of the stall check's agent: a swallowed SIGTERM costs this
STALL_FLAG = 0.8 * STALL_TIMEOUT
WARMUP_CALLS = 20
SETTLE = 2.0  # seconds after the fleet is up before idle CPU is measured


def run(ctx: Context, wanted: set[int], check_stalls: bool) -> None:
    smallest, largest = min(ctx.sizes.fleets), max(ctx.sizes.fleets)
    for n in ctx.sizes.fleets:
        todo = set()
        if 2 in wanted:
            todo.add("status")
        if 3 in wanted and n == largest:
            todo.add("list")
        if 4 in wanted and n == smallest:
            todo.add("crash")
        if check_stalls and n == smallest:
            todo.add("stall")
        if 7 in wanted and (n == largest or ctx.full):
            todo.add("footprint")
        if 8 in wanted and n == smallest:
            todo.add("rest")
        if todo:
            _fleet(ctx, n, todo)


def _fleet(ctx: Context, n: int, todo: set[str]) -> None:
    drivers: dict[str, Driver] = {}
    try:
        for system in ctx.systems:
            ctx.say(f"fleet N={n}: starting {system}")
            drivers[system] = ctx.make(system)
            seconds = drivers[system].start(Fleet(n, extra=[(STALL_AGENT, STALL_TIMEOUT)]))
            ctx.say(f"fleet N={n}: {system} up in {seconds:.2f} s")
            api_spawn = getattr(drivers[system], "api_spawn_seconds", None)
            if api_spawn is not None:
                ctx.rec.add(f"1b.api_spawn.N={n}", system, api_spawn)
        time.sleep(SETTLE)
        everyone = list(drivers.values())
        target = f"a{n // 2:04d}"
        kills_per_round = -(-ctx.sizes.kills // ctx.rounds)
        stalls_per_round = -(-ctx.sizes.start_stops // ctx.rounds)
        kill_index = 0
        for r in range(ctx.rounds):
            if "footprint" in todo:
                _footprint(ctx, n, drivers)
            for system in ctx.order(r):
                driver = drivers[system]
                with ctx.focus(driver, everyone):
                    if "status" in todo:
                        _status(ctx, f"2.status.N={n}", system, driver.status, target)
                    if "list" in todo:
                        samples = _timed(driver.list, ctx.sizes.list_calls_per_round)
                        ctx.rec.add(f"3.list.N={n}", system, *samples)
                    if "crash" in todo:
                        names = driver.fleet.names() if driver.fleet else []
                        for k in range(kills_per_round):
                            name = names[(kill_index + k) % len(names)]
                            ctx.rec.add("4.crash_restart", system, driver.kill_and_wait_restart(name))
                    if "stall" in todo:
                        for _ in range(stalls_per_round):
                            seconds = driver.start_stop(STALL_AGENT)
                            ctx.rec.add("5b.start_stop", system, seconds)
                            if seconds >= STALL_FLAG:
                                ctx.say(f"STALL: {system} took {seconds:.2f} s to stop a just-started agent")
                    if "rest" in todo and isinstance(driver, OpmasdDriver):
                        _rest(ctx, driver, target)
            kill_index += kills_per_round
            ctx.say(f"fleet N={n}: round {r + 1} done")
    finally:
        for driver in drivers.values():
            ctx.close(driver)
    if "stall" in todo:
        ctx.rec.note(
            "5b.start_stop",
            f"start an agent, then stop it at once ({ctx.sizes.start_stops} times per system; stop timeout "
            f"{STALL_TIMEOUT:g} s, a stop ≥ {STALL_FLAG:g} s counts as a stall: a SIGTERM swallowed "
            "between fork and exec). supervisord: startProcess(wait=false) then stopProcess(wait=true); "
            "circus: start (not waiting) then stop (waiting); opmasd: StartAgent then StopAgent",
        )


def _timed(call: object, count: int, *args: object) -> list[float]:
    samples = []
    check_interrupted()
    for _ in range(count):
        t0 = time.perf_counter()
        call(*args)  # type: ignore[operator]
        samples.append(time.perf_counter() - t0)
    return samples


def _status(ctx: Context, key: str, system: str, call: object, target: str) -> None:
    _timed(call, WARMUP_CALLS, target)
    ctx.rec.add(key, system, *_timed(call, ctx.sizes.calls_per_round, target))


def _footprint(ctx: Context, n: int, drivers: dict[str, Driver]) -> None:
    before = {system: driver.footprint() for system, driver in drivers.items()}
    t0 = time.perf_counter()
    time.sleep(ctx.sizes.footprint_window)
    wall = time.perf_counter() - t0
    for system, driver in drivers.items():
        rss, cpu, helper_rss, helper_cpu = driver.footprint()
        ctx.rec.add(f"7.rss.N={n}", system, rss / 2**20)
        ctx.rec.add(f"7.idle_cpu.N={n}", system, 100.0 * (cpu - before[system][1]) / wall)
        if helper_rss:
            ctx.rec.add(f"7.helpers_rss.N={n}", system, helper_rss / 2**20)
            ctx.rec.add(f"7.helpers_idle_cpu.N={n}", system, 100.0 * (helper_cpu - before[system][3]) / wall)


def _rest(ctx: Context, driver: OpmasdDriver, target: str) -> None:
    if not driver.has_rest():
        ctx.rec.note("8.rest", "n/a (not built yet: opmasd does not serve REST on rest.address)")
        return
    ctx.rec.note(
        "8.rest",
        "GET /api/v1/agents/{id}/status on a kept-alive HTTP/1.1 connection vs GetAgentStatus over "
        "gRPC on TCP (same address family), interleaved in batches; also the daemon's own CPU time "
        "per call (user + system over each batch / its calls), less noisy than latency on a busy machine",
    )
    for _ in range(2):  # two interleaved halves per round
        _status_with_cpu(ctx, "8.rest", driver, driver.status_rest, target)
        _status_with_cpu(ctx, "8.grpc_tcp", driver, driver.status_tcp, target)


def _status_with_cpu(ctx: Context, key: str, driver: Driver, call: object, target: str) -> None:
    """Scenario 2's batch (`<key>_status`), plus the daemon's CPU seconds per call (`<key>_cpu`)."""
    _timed(call, WARMUP_CALLS, target)
    cpu_before = driver.footprint()[1]
    samples = _timed(call, ctx.sizes.calls_per_round, target)
    cpu_after = driver.footprint()[1]
    ctx.rec.add(f"{key}_status", "opmasd", *samples)
    ctx.rec.add(f"{key}_cpu", "opmasd", (cpu_after - cpu_before) / len(samples))
