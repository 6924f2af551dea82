"""Simulated agents publishing heartbeats on NATS at a fixed rate (DESIGN §5 agent.{id}.status).

Runs as its own process (so the publisher does not share a GIL with the benchmark's probes):
  heartbeat_load.py URL SUBJECT RATE SECONDS AGENT_ID...
SUBJECT may hold {id}, replaced by each message's agent id (each agent's own subject).
Prints {"sent": n, "seconds": s} when done.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from datetime import UTC, datetime

import nats


def message(agent_id: str, timestamp: str) -> bytes:
    body = {"agent_id": agent_id, "status": "running", "timestamp": timestamp, "metadata": {}}
    return json.dumps(body, separators=(",", ":")).encode()


async def main(url: str, subject: str, rate: float, seconds: float, agents: list[str]) -> None:
    nc = await nats.connect(url, pending_size=256 * 2**20, max_reconnect_attempts=0)
    ids = itertools.cycle(agents)
    sent = 0
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) - sent
        if due > 0:
            timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            for _ in range(due):
                agent_id = next(ids)
                await nc.publish(subject.replace("{id}", agent_id), message(agent_id, timestamp))
            sent += due
        await asyncio.sleep(0.001)
    await nc.flush(timeout=30)
    took = time.perf_counter() - t0
    await nc.close()
    print(json.dumps({"sent": sent, "seconds": took}), flush=True)


if __name__ == "__main__":
    url, subject, rate, seconds, *agent_ids = sys.argv[1:]
    asyncio.run(main(url, subject, float(rate), float(seconds), agent_ids))
