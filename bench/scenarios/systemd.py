"""9. The systemd backend: start and stop N agents as transient units, against plain systemd-run.

Needs opmasd's systemd backend (opmasd/runtime/systemd.py) and a booted systemd (PID 1: the
directory /run/systemd/system exists); otherwise the row says which is missing.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from common import RUN_ID, wait_until
from context import Context
from peers.base import Fleet
from peers.opmasd import OpmasdDriver, has_systemd_backend

from opmas.v1 import agents_pb2 as pb


def systemd(ctx: Context) -> None:
    if "opmasd" not in ctx.systems:
        return
    if not has_systemd_backend():
        ctx.rec.note("9.systemd", "n/a (not built yet: opmasd has no systemd backend)")
        return
    if not Path("/run/systemd/system").is_dir():
        ctx.rec.note("9.systemd", "n/a (systemd is not PID 1 on this machine)")
        return
    n = ctx.sizes.systemd_units
    ctx.rec.note(
        "9.systemd",
        f"{n} agents with runtime=systemd: concurrent StartAgent until all running, concurrent StopAgent "
        f"until all stopped; vs {n} x `systemd-run --unit=… sleep` then one `systemctl stop` of all",
    )
    driver = OpmasdDriver(ctx.nats_url)
    ctx._live.append(driver)
    names = [f"u{i:04d}" for i in range(n)]
    try:
        driver.start(Fleet(0))
        stub = driver.stub
        for name in names:
            spec = pb.AgentSpec(name=name, command=["/bin/sleep", "100000"], runtime=pb.RUNTIME_KIND_SYSTEMD)
            stub.CreateAgent(pb.CreateAgentRequest(agent_id=name, spec=spec), timeout=30)
        for r in range(ctx.rounds):
            for system in ["opmasd", "systemd-run"] if r % 2 == 0 else ["systemd-run", "opmasd"]:
                if system == "opmasd":
                    t0 = time.perf_counter()
                    for call in [stub.StartAgent.future(pb.StartAgentRequest(agent_id=x)) for x in names]:
                        call.result()
                    wait_until(lambda: driver.running_count() >= n, 120.0)
                    ctx.rec.add("9.systemd_start", "opmasd", time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    for call in [stub.StopAgent.future(pb.StopAgentRequest(agent_id=x)) for x in names]:
                        call.result()
                    ctx.rec.add("9.systemd_stop", "opmasd", time.perf_counter() - t0)
                else:
                    units = [f"bench-{RUN_ID}-{i}.service" for i in range(n)]
                    t0 = time.perf_counter()
                    for unit in units:
                        subprocess.run(
                            ["systemd-run", "--quiet", "--collect", f"--unit={unit}", "/bin/sleep", "100000"],
                            check=True,
                        )
                    ctx.rec.add("9.systemd_start", "systemd-run", time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    subprocess.run(["systemctl", "stop", *units], check=False)
                    ctx.rec.add("9.systemd_stop", "systemd-run", time.perf_counter() - t0)
    finally:
        ctx.close(driver)
