"""What a flood of unauthenticated requests costs the callers that have a token.

    .venv/bin/python bench/flood.py [--requests 10000] [--concurrency 500] [--samples 400]

Issue 11: "a flood of unauthenticated requests (10 000 from one peer) does not slow
authenticated calls by more than 2x and leaves no state behind". One opmasd with 10 agents;
a viewer token; GetAgentStatus over TCP gRPC and REST, one call after another, timed first on
a quiet daemon and then while a separate process sends `--requests` calls without a token
(`--concurrency` gRPC calls in flight; over `--connections` connections), for at most
`--seconds`, with the `--samples` timed calls spread evenly over it. The flood runs on a CPU
of its own (as from another machine: its own CPU use is not the daemon's cost), the daemon
and the timed calls on another. Prints the mean, p50 and p99 of both phases and their
ratio, what the flood got back, and the daemon's open files and RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from common import cleanup_all, percentile
from peers.base import Fleet
from peers.opmasd import OpmasdDriver


def grpc_flood(
    address: str,
    requests: int,
    concurrency: int,
    connections: int,
    seconds: float,
    out: multiprocessing.Queue[object],
) -> None:
    import grpc

    from opmas.v1 import agents_pb2 as pb
    from opmas.v1 import agents_pb2_grpc

    async def run() -> None:
        codes: Counter[str] = Counter()
        # Each its own connection (grpc would otherwise share one subchannel between them).
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
        stubs = [agents_pb2_grpc.AgentServiceStub(channel) for channel in channels]
        left = requests
        t0 = time.perf_counter()

        async def worker(stub: agents_pb2_grpc.AgentServiceStub) -> None:
            nonlocal left
            while left > 0 and time.perf_counter() < t0 + seconds:
                left -= 1
                try:
                    await stub.GetAgentStatus(
                        pb.GetAgentStatusRequest(agent_id="a0000"),
                        timeout=t0 + seconds + 1 - time.perf_counter(),
                    )
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

        await asyncio.gather(*(worker(stubs[i % connections]) for i in range(concurrency)))
        for channel in channels:
            await channel.close()
        out.put((time.perf_counter() - t0, dict(codes)))

    asyncio.run(run())


def rest_flood(
    address: str, requests: int, connections: int, seconds: float, out: multiprocessing.Queue[object]
) -> None:
    import aiohttp

    async def run() -> None:
        codes: Counter[str] = Counter()
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            left = requests
            t0 = time.perf_counter()

            async def worker() -> None:
                nonlocal left
                while left > 0 and time.perf_counter() < t0 + seconds:
                    left -= 1
                    try:
                        limit = aiohttp.ClientTimeout(total=t0 + seconds + 1 - time.perf_counter())
                        async with session.get(
                            f"http://{address}/api/v1/agents/a0000/status", timeout=limit
                        ) as reply:
                            await reply.read()
                            codes[str(reply.status)] += 1
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        codes[type(exc).__name__] += 1

            await asyncio.gather(*(worker() for _ in range(connections)))
        out.put((time.perf_counter() - t0, dict(codes)))

    asyncio.run(run())


def timed(call: object, samples: int, every: float = 0.0, while_: object = None) -> list[float]:
    """Durations of `samples` calls, one each `every` seconds (while `while_()` holds)."""
    durations = []
    for _ in range(samples):
        if while_ is not None and not while_():  # type: ignore[operator]
            break
        t0 = time.perf_counter()
        call()  # type: ignore[operator]
        durations.append(time.perf_counter() - t0)
        time.sleep(max(0.0, t0 + every - time.perf_counter()))
    return durations


def footprint(pid: int) -> tuple[int, float]:
    process = psutil.Process(pid)
    return process.num_fds(), process.memory_info().rss / 1e6


def measure(
    name: str,
    driver: OpmasdDriver,
    call: object,
    flood: multiprocessing.Process,
    args: argparse.Namespace,
    out: multiprocessing.Queue[object],
) -> None:
    assert driver.popen is not None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # the daemon and the timed calls on one CPU, the flood on another
        for pid in (0, driver.popen.pid, *(c.pid for c in psutil.Process(driver.popen.pid).children())):
            os.sched_setaffinity(pid, cpus[:1])
    # The samples are spread over the flood (one each `every` seconds), as calls of token
    # holders would be (back to back, they would all fall in its first second); the quiet ones
    # too, so that both phases pay the same wake-ups from idle.
    every = max(0.0, (args.seconds - 0.5) / args.samples)
    quiet = timed(call, args.samples, every)
    before = footprint(driver.popen.pid)
    flood.start()
    if len(cpus) >= 2 and flood.pid is not None:
        os.sched_setaffinity(flood.pid, cpus[1:])
    time.sleep(0.3)  # the flood is under way
    loud = timed(call, args.samples, every, flood.is_alive)
    peak = max(before[1], footprint(driver.popen.pid)[1])
    seconds, codes = out.get(timeout=600)  # type: ignore[misc]
    flood.join()
    time.sleep(1.0)
    after = footprint(driver.popen.pid)
    q50, l50 = percentile(quiet, 50) * 1e3, percentile(loud, 50) * 1e3 if loud else float("nan")
    q99, l99 = percentile(quiet, 99) * 1e3, percentile(loud, 99) * 1e3 if loud else float("nan")
    mean_q, mean_l = sum(quiet) / len(quiet) * 1e3, sum(loud) / max(1, len(loud)) * 1e3
    print(f"{name}: quiet mean {mean_q:.3f} ms, flooded mean {mean_l:.3f} ms: ratio {mean_l / mean_q:.2f}x")
    print(f"{name}: quiet p50 {q50:.3f} ms p99 {q99:.3f} ms | flooded p50 {l50:.3f} ms p99 {l99:.3f} ms "
          f"({len(loud)} samples) | ratio p50 {l50 / q50:.2f}x")  # fmt: skip
    print(f"  flood: {sum(codes.values())} of {args.requests} requests answered in {seconds:.2f} s: {codes}")
    print(
        f"  daemon fds/RSS before {before[0]} / {before[1]:.1f} MB, at the flood's end {peak:.1f} MB, "
        f"after {after[0]} / {after[1]:.1f} MB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=500, help="gRPC calls in flight")
    parser.add_argument("--connections", type=int, default=100, help="connections the flood uses")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=20.0, help="the flood stops after this long")
    parser.add_argument("--only", choices=("grpc", "rest"), default=None)
    args = parser.parse_args()
    driver = OpmasdDriver()
    try:
        driver.prepare(Fleet(n=10))
        driver.boot()
        driver.status_tcp("a0000"), driver.status_rest("a0000")  # connections and token made
        ctx = multiprocessing.get_context("spawn")
        if args.only in (None, "grpc"):
            out: multiprocessing.Queue[object] = ctx.Queue()
            flood = ctx.Process(
                target=grpc_flood,
                args=(
                    driver.grpc_address,
                    args.requests,
                    args.concurrency,
                    args.connections,
                    args.seconds,
                    out,
                ),
            )
            measure("gRPC GetAgentStatus", driver, lambda: driver.status_tcp("a0000"), flood, args, out)
        if args.only in (None, "rest"):
            out = ctx.Queue()
            flood = ctx.Process(
                target=rest_flood,
                args=(driver.rest_address, args.requests, args.connections, args.seconds, out),
            )
            measure("REST GET status", driver, lambda: driver.status_rest("a0000"), flood, args, out)
    finally:
        driver.close()
        cleanup_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
