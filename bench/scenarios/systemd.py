"""9. The systemd backend: N agents as transient units through opmasd, against `systemd-run`.

Both inside one throwaway systemd 252 booted for the scenario in namespaces of its own
(tests/systemd_sandbox.py: root only; the machine's own PID 1 is never used), in the same run,
alternating which goes first each round:

- opmasd (on the host, `agents.runtime` systemd over the sandbox's system bus, as the e2e tests
  drive it): N agents registered once; each round N concurrent `StartAgent` until the API says
  all running (the units active: opmasd reports running from the unit's ActiveState), then one
  `StopAgents(all)`, answered when every unit has stopped. Starts that fail are counted (a
  round with one is not timed).
- systemd-run, inside the sandbox: N x `systemd-run --unit=… -p … /bin/sleep 100000` one after
  the other, with the type and sandboxing opmasd gives an agent by default (the same units;
  each returns once its start job is done: the unit active), then one `systemctl stop`
  of them all (returns when every stop job is done).

After each half, `systemctl list-units` inside checks that N units were active and none is left
(not timed). opmasd's units run the program under systemd-cat (its journal streams), one exec
more than systemd-run's; systemd-run as root talks to PID 1 over its private socket, opmasd
over the system bus (dbus-daemon).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from common import REPO, RUN_ID, BenchError, wait_until
from context import Context
from peers.base import Fleet
from peers.opmasd import OpmasdDriver, has_systemd_backend

from opmas.v1 import agents_pb2 as pb
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.systemd_sandboxing import sandbox_properties

sys.path.insert(0, str(REPO / "tests"))  # the tests' sandbox, shared rather than copied
from systemd_sandbox import SandboxError, SandboxUnavailable, SystemdSandbox

KEY = "9.systemd"
SLEEP = ["/bin/sleep", "100000"]


def _same_sandbox() -> list[str]:
    """systemd-run's `-p` options for the unit type and sandbox opmasd gives an agent (a mount
    namespace and more: about 30 ms of systemd's time per unit), so both start the same units."""
    # Type=exec as opmasd's units: started once the program was executed, not once forked.
    options = ["-p", "Type=exec"]
    for name, signature, value in sandbox_properties(LaunchRequest("bench", tuple(SLEEP), "/"), euid=0):
        if signature == "b":
            value = "yes" if value else "no"
        elif name == "CapabilityBoundingSet" and value == 0:
            value = ""
        options += ["-p", f"{name}={value}"]
    return options


def systemd(ctx: Context) -> None:
    if "opmasd" not in ctx.systems:
        return
    if not has_systemd_backend():
        ctx.rec.note(KEY, "n/a (not built yet: opmasd has no systemd backend)")
        return
    if os.geteuid() != 0:
        ctx.rec.note(KEY, "n/a (booting a test systemd in its own namespaces needs root)")
        return
    sandbox = SystemdSandbox()
    try:
        sandbox.start()
    except (SandboxUnavailable, SandboxError) as exc:
        sandbox.stop()
        reason = str(exc).splitlines()[0]
        ctx.rec.note(KEY, f"n/a (the test systemd did not boot: {reason})")
        return
    try:
        _measure(ctx, sandbox)
    finally:
        sandbox.stop()


def _measure(ctx: Context, sandbox: SystemdSandbox) -> None:
    n = ctx.sizes.systemd_units
    version = sandbox.run("systemctl", "show", "--property=Version", "--value").stdout.strip()
    ctx.rec.note(
        KEY,
        f"{n} agents in a booted systemd {version} (namespaces of its own): opmasd (systemd runtime, "
        f"over its system bus) {n} concurrent StartAgent until all running, one StopAgents(all); vs "
        f"{n} x `systemd-run --unit=… /bin/sleep 100000` in a row, one `systemctl stop` of all",
    )
    ctx.rec.data.setdefault("systemd_sandbox", {})["boot_seconds"] = sandbox.boot_seconds
    root = f"/proc/{sandbox.pid}/root"
    driver = OpmasdDriver(ctx.nats_url)
    driver.extra_env = {
        "OPMAS_AGENTS_SYSTEMD": "required",
        "OPMAS_AGENTS_RUNTIME": "systemd",
        "OPMAS_AGENTS_SYSTEMD_BUS": sandbox.bus_address,
        "OPMAS_AGENTS_SYSTEMD_ROOT": root,
        "OPMAS_AGENTS_SYSTEMD_JOURNAL": f"{root}/run/log/journal",
    }
    ctx._live.append(driver)
    names = [f"u{i:04d}" for i in range(n)]
    try:
        driver.start(Fleet(0))
        stub = driver.stub
        for name in names:
            spec = pb.AgentSpec(name=name, command=SLEEP, runtime=pb.RUNTIME_KIND_SYSTEMD)
            stub.CreateAgent(pb.CreateAgentRequest(agent_id=name, spec=spec), timeout=30)
        for r in range(ctx.rounds):
            for system in ("opmasd", "systemd-run") if r % 2 == 0 else ("systemd-run", "opmasd"):
                ctx.say(f"9 systemd round {r + 1}/{ctx.rounds}: {system}, {n} units")
                try:
                    if system == "opmasd":
                        _opmasd_round(ctx, driver, names, sandbox)
                    else:
                        _systemd_run_round(ctx, n, sandbox)
                except Exception:
                    _say_why(sandbox, driver)
                    raise
    finally:
        ctx.close(driver)


def _say_why(sandbox: SystemdSandbox, driver: OpmasdDriver) -> None:
    """What the test systemd and opmasd said, on stderr, before the sandbox goes with it."""
    argv = ["systemctl", "list-units", "--plain", "--no-legend", "--no-pager", "--state=activating"]
    stuck = sandbox.run(*argv, check=False).stdout
    units = [line.split()[0] for line in stuck.splitlines() if line.strip()][:3]
    print(f"units activating inside:\n{stuck}", file=sys.stderr)
    for unit in units:
        status = sandbox.run("systemctl", "status", "--no-pager", "--lines=20", unit, check=False).stdout
        print(status, file=sys.stderr)
    journal = sandbox.run("journalctl", "--no-pager", "--lines=80", "--output=short-precise", check=False)
    print(f"the test systemd's journal (end):\n{journal.stdout}", file=sys.stderr)
    print(f"opmasd's log (end):\n{driver.log_tail()}", file=sys.stderr, flush=True)


def _opmasd_round(ctx: Context, driver: OpmasdDriver, names: list[str], sandbox: SystemdSandbox) -> None:
    stub = driver.stub
    n = len(names)
    t0 = time.perf_counter()
    calls = [stub.StartAgent.future(pb.StartAgentRequest(agent_id=x), timeout=120) for x in names]
    refused = [call.exception() for call in calls if call.exception() is not None]
    # A start that failed is counted, and the round's times are not (they would be the timeout).
    ctx.rec.add("9.systemd_start_failures", "opmasd", len(refused))
    if refused:
        print(f"9: {len(refused)} of {n} starts failed, e.g.: {refused[0]}", file=sys.stderr, flush=True)
    else:
        ctx.rec.add("9.systemd_start_api", "opmasd", time.perf_counter() - t0)
        wait_until(lambda: driver.running_count() >= n, 120.0, what=f"{n} agents running")
        ctx.rec.add("9.systemd_start", "opmasd", time.perf_counter() - t0)
        _check_active(sandbox, "opmas-agent-*.service", n)
    t0 = time.perf_counter()
    reply = stub.StopAgents(pb.StopAgentsRequest(all=True), timeout=300)
    if not refused:
        ctx.rec.add("9.systemd_stop", "opmasd", time.perf_counter() - t0)
    failed = [r for r in reply.results if r.code != 0]
    if failed or len(reply.results) < n:
        raise BenchError(f"StopAgents: {len(reply.results)} results, failed: {failed[:3]}")
    _check_active(sandbox, "opmas-agent-*.service", 0)


def _systemd_run_round(ctx: Context, n: int, sandbox: SystemdSandbox) -> None:
    units = [f"bench-{RUN_ID}-{i}.service" for i in range(n)]
    # One nsenter for the whole loop: its own cost (~ms) is not systemd-run's.
    run = ["systemd-run", "--quiet", "--collect", *_same_sandbox()]
    starts = "\n".join(shlex.join([*run, f"--unit={unit}", *SLEEP]) + " || exit 1" for unit in units)
    script = f'a=$(date +%s%N)\n{starts}\nb=$(date +%s%N)\necho "$a $b"\n'
    began, ended = sandbox.run("/bin/sh", "-c", script, timeout=300).stdout.split()
    ctx.rec.add("9.systemd_start", "systemd-run", (int(ended) - int(began)) / 1e9)
    _check_active(sandbox, f"bench-{RUN_ID}-*.service", n)
    stop = shlex.join(["systemctl", "stop", *units])
    script = f'a=$(date +%s%N)\n{stop} || exit 1\nb=$(date +%s%N)\necho "$a $b"\n'
    began, ended = sandbox.run("/bin/sh", "-c", script, timeout=300).stdout.split()
    ctx.rec.add("9.systemd_stop", "systemd-run", (int(ended) - int(began)) / 1e9)
    _check_active(sandbox, f"bench-{RUN_ID}-*.service", 0)


def _check_active(sandbox: SystemdSandbox, pattern: str, expected: int) -> None:
    """That `expected` units matching pattern are active inside (not timed)."""
    argv = ["systemctl", "list-units", "--plain", "--no-legend", "--no-pager", "--state=active", pattern]
    active = len([line for line in sandbox.run(*argv).stdout.splitlines() if line.strip()])
    if active != expected:
        raise BenchError(f"{active} units {pattern} active inside the test systemd, expected {expected}")
