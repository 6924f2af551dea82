"""Process-runtime agents outlive opmasd's unit (issue 12): opmasd runs as a service of a real
systemd (the sandbox of tests/systemd_sandbox.py), KillMode=mixed or control-group, with
agents.process_scopes.

- Each agent runs in its scope `opmas-proc-<id>.scope`, and the log relay in one of its own,
  outside opmasd's cgroup: `systemctl restart` leaves them running; the new opmasd adopts the
  agent (same PID, running) and its log keeps growing through the same relay.
- A stop of the agent ends its whole tree, a process that left its session included (the
  scope's cgroup holds it), and the scope goes.
- `systemctl stop` of opmasd with stop_agents_on_shutdown stops the agents too.
- A crash-looping agent restarts in a new scope of the same name; an agent scope no agent
  claims is emptied at start.

opmasd must run inside the sandbox (a scope takes PIDs of systemd's PID namespace), so its
files are under the sandbox's base directory (/var/tmp, which both sides see) and it is driven
from here over its unix socket there.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_fixtures import until
from systemd_sandbox import SystemdSandbox

from .harness import OPMASCTL, spawn

pytestmark = pytest.mark.timeout(240)

UNIT = "opmasd-scopes.service"
TICKER = 'setsid sleep 1000 & i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.1; done'


class InnerDaemon:
    """opmasd as the unit UNIT of the sandbox's systemd, with its files under `root`."""

    def __init__(self, sd: SystemdSandbox, root: Path) -> None:
        self.sd = sd
        self.root = root
        self.socket = root / "run" / "opmasd.sock"
        for name in ("state", "run", "log", "agents"):
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "opmasd.yaml").write_text("# every setting comes from OPMAS_* variables\n")

    def write_unit(self, stop_agents: bool, kill_mode: str = "mixed") -> None:
        env = {
            "OPMAS_SERVICE_STATE_DIR": self.root / "state",
            "OPMAS_SERVICE_RUNTIME_DIR": self.root / "run",
            "OPMAS_SERVICE_LOG_DIR": self.root / "log",
            "OPMAS_SERVICE_LOG_FORMAT": "json",
            "OPMAS_SERVICE_STOP_AGENTS_ON_SHUTDOWN": str(stop_agents).lower(),
            "OPMAS_SERVICE_DISCOVERY_INTERVAL": "3600",
            "OPMAS_AGENTS_DIRS": self.root / "agents",
            "OPMAS_AGENTS_PROCESS_SCOPES": "on",
            "OPMAS_AGENTS_SYSTEMD": "off",
            "OPMAS_AGENTS_STOP_TIMEOUT": "5",
            "OPMAS_AGENTS_BACKOFF_INITIAL": "0.05",
            "OPMAS_AGENTS_BACKOFF_MAX": "0.1",
            "OPMAS_GRPC_ADDRESS": "",
            "OPMAS_REST_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        lines = "\n".join(f'Environment="{key}={value}"' for key, value in env.items())
        unit = (
            f"[Service]\nType=notify\nNotifyAccess=main\nKillMode={kill_mode}\nTimeoutStopSec=30\n"
            f"StandardOutput=append:{self.root}/opmasd.out\nStandardError=inherit\n{lines}\n"
            f"ExecStart={sys.executable} -m opmasd --config {self.root}/opmasd.yaml\n"
        )
        self.sd.host_path(f"/run/systemd/system/{UNIT}").write_text(unit)
        self.sd.run("systemctl", "daemon-reload")

    def systemctl(self, verb: str) -> None:
        result = self.sd.run("systemctl", verb, UNIT, check=False, timeout=60)
        assert result.returncode == 0, f"systemctl {verb}: {result.stderr}\n{self.output()}"

    def output(self) -> str:
        try:
            return (self.root / "opmasd.out").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def opmasctl(self, *args: str, raw: bool = False) -> Any:
        popen = spawn(
            [*OPMASCTL, "--server", f"unix://{self.socket}", "-o", "json", *args],
            stdout=-1,
            stderr=-1,
            text=True,
        )
        out, err = popen.communicate(timeout=30)
        assert popen.returncode == 0, f"opmasctl {' '.join(args)}: {err}\n{self.output()}"
        return out if raw or not out.strip() else json.loads(out)

    def agent(self, agent_id: str) -> dict[str, Any]:
        return dict(self.opmasctl("agents", "get", agent_id)["status"])

    def ticks(self, agent_id: str) -> int:
        """The last tick in the agent's log."""
        out = self.opmasctl("agents", "logs", agent_id, "--tail", "20", raw=True)
        lines = [json.loads(line).get("line", "") for line in str(out).splitlines() if line.strip()]
        numbers = [int(line.split()[1]) for line in lines if line.startswith("tick ")]
        return max(numbers, default=0)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sd.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=False)
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def members(self, unit: str) -> list[int]:
        """PIDs (in the sandbox) in the unit's cgroup."""
        group = self.show(unit, "ControlGroup").get("ControlGroup", "")
        if not group:
            return []
        out = self.sd.run("cat", f"/sys/fs/cgroup/unified{group}/cgroup.procs", check=False).stdout
        return [int(pid) for pid in out.split()]

    def lasting(self, unit: str) -> set[int]:
        """The members of the unit's cgroup but the ticker's passing `sleep 0.1`s."""
        found = set()
        for pid in self.members(unit):
            cmdline = self.sd.run("cat", f"/proc/{pid}/cmdline", check=False).stdout
            if cmdline and "sleep\x000.1" not in cmdline:
                found.add(pid)
        return found

    def limit(self, unit: str, controller: str) -> str:
        """The unit's limit in its cgroup (v2 file, else the v1 one)."""
        group = self.show(unit, "ControlGroup")["ControlGroup"]
        files = {"memory": ("memory.max", "memory.limit_in_bytes"), "pids": ("pids.max", "pids.max"),
                 "cpu": ("cpu.max", "cpu.cfs_quota_us")}[controller]  # fmt: skip
        for path in (
            f"/sys/fs/cgroup/unified{group}/{files[0]}",
            f"/sys/fs/cgroup/{controller}{group}/{files[1]}",
        ):
            out = self.sd.run("cat", path, check=False)
            if out.returncode == 0:
                return out.stdout.split()[0]
        return ""

    def alive(self, pid: int) -> bool:
        return self.sd.run("kill", "-0", str(pid), check=False).returncode == 0

    def units(self, pattern: str) -> list[str]:
        out = self.sd.run("systemctl", "list-units", "--plain", "--no-legend", pattern, check=False).stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())


@pytest.fixture
def inner(systemd_sandbox: SystemdSandbox) -> Iterator[InnerDaemon]:
    # A directory of its own per test: the sandbox (and its base directory) is the session's.
    daemon = InnerDaemon(
        systemd_sandbox, Path(tempfile.mkdtemp(prefix="scopes-", dir=systemd_sandbox.base_dir))
    )
    try:
        yield daemon
    finally:
        sd = systemd_sandbox
        sd.run("systemctl", "stop", UNIT, check=False, timeout=60)
        sd.run("systemctl", "stop", "opmas-proc-*.scope", "opmas-logrelay-*.scope", check=False)
        sd.host_path(f"/run/systemd/system/{UNIT}").unlink(missing_ok=True)
        sd.run("systemctl", "daemon-reload", check=False)


@pytest.mark.parametrize("kill_mode", ["mixed", "control-group"])
def test_agents_and_their_relay_outlive_a_restart_of_opmasds_unit(inner: InnerDaemon, kill_mode: str) -> None:
    inner.write_unit(stop_agents=False, kill_mode=kill_mode)
    inner.systemctl("start")
    inner.opmasctl(
        "agents", "register", "--name", "ticker", "--memory-max", "64M", "--cpu-quota", "50",
        "--tasks-max", "32", "--start", "--", "/bin/sh", "-c", TICKER,
    )  # fmt: skip
    status = until(lambda: (a := inner.agent("ticker"))["state"] == "AGENT_STATE_RUNNING" and a)
    pid = int(status["pid"])
    scope = "opmas-proc-ticker.scope"
    # The agent's tree is its scope, in the slice of opmasd's unit and not in opmasd's cgroup.
    assert inner.show(scope, "ActiveState", "Slice") == {"ActiveState": "active", "Slice": "system.slice"}
    # Its limits are the scope's, enforced by the kernel (cgroup v1 controllers on this host).
    limits = inner.show(scope, "MemoryMax", "CPUQuotaPerSecUSec", "TasksMax")
    assert limits == {"MemoryMax": str(64 << 20), "CPUQuotaPerSecUSec": "500ms", "TasksMax": "32"}
    assert inner.limit(scope, "memory") == str(64 << 20)
    assert inner.limit(scope, "pids") == "32"
    assert inner.limit(scope, "cpu") == "50000"
    tree = until(lambda: len(m := inner.lasting(scope)) == 2 and m, what="the ticker's tree")
    assert pid in tree  # and its `setsid sleep 1000`
    assert not set(tree) & set(inner.members(UNIT))
    relays = inner.units("opmas-logrelay-*.scope")
    assert len(relays) == 1, relays
    assert not set(inner.members(relays[0])) & set(inner.members(UNIT))
    before = until(lambda: inner.ticks("ticker"), what="the first ticks")

    inner.systemctl("restart")  # everything left in opmasd's cgroup is killed

    after = until(lambda: (a := inner.agent("ticker"))["state"] == "AGENT_STATE_RUNNING" and a)
    assert int(after["pid"]) == pid  # adopted: the same process
    assert inner.lasting(scope) == tree  # the whole tree is still there
    assert inner.units("opmas-logrelay-*.scope") == relays  # the same relay
    # The log goes on: written by the same relay, through the restart.
    until(lambda: inner.ticks("ticker") > before + 20, what="ticks after the restart")

    # A stop ends the whole tree, the `setsid sleep` that left the agent's session included.
    inner.opmasctl("agents", "stop", "ticker")
    assert inner.agent("ticker")["state"] == "AGENT_STATE_STOPPED"
    assert not [p for p in tree if inner.alive(p)]
    until(lambda: inner.show(scope, "ActiveState").get("ActiveState") in (None, "inactive"), what="no scope")

    # Started again, in a new scope of the same name.
    inner.opmasctl("agents", "start", "ticker")
    again = int(inner.agent("ticker")["pid"])
    assert again != pid and again in inner.members(scope)

    # With stop_agents_on_shutdown, a stop of opmasd stops its agents (the running opmasd has
    # it off: the restart that brings the new setting leaves the agent running).
    inner.write_unit(stop_agents=True, kill_mode=kill_mode)
    inner.systemctl("restart")
    assert int(inner.agent("ticker")["pid"]) == again
    tree = inner.lasting(scope)
    inner.systemctl("stop")
    assert not [p for p in tree if inner.alive(p)]
    assert inner.show(scope, "ActiveState").get("ActiveState") in (None, "inactive")


def test_a_crashing_agent_is_restarted_in_a_new_scope_of_the_same_name(inner: InnerDaemon) -> None:
    # An agent scope no agent claims (its agent deleted while opmasd was down): emptied at start.
    inner.sd.run("sh", "-c", "systemd-run --scope --unit opmas-proc-ghost sleep 300 >/dev/null 2>&1 &")
    until(lambda: inner.show("opmas-proc-ghost.scope", "ActiveState").get("ActiveState") == "active")
    inner.write_unit(stop_agents=True)
    inner.systemctl("start")
    until(lambda: inner.show("opmas-proc-ghost.scope", "ActiveState").get("ActiveState") != "active")
    assert "killed 1 unmanaged process(es)" in inner.output()
    inner.opmasctl(
        "agents", "register", "--name", "crasher", "--restart-policy", "always", "--start-seconds", "0",
        "--", "/bin/sh", "-c", "sleep 0.2; exit 3",
    )  # fmt: skip
    inner.opmasctl("agents", "start", "crasher")
    # Each run is a new scope of the same name, made while the last one may still be loaded.
    status = until(lambda: int((a := inner.agent("crasher")).get("restartCount", 0)) >= 4 and a, 30)
    assert status["state"] != "AGENT_STATE_ERROR", status
    log = (inner.root / "opmasd.out").read_text()
    assert "into a scope" not in log, log[-3000:]
