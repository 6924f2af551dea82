"""opmasd itself as the shipped unit systemd/opmasd.service, run by a real systemd 252 (issue 12).

The unit file is installed unchanged in the sandbox's /run/systemd/system; one drop-in replaces
ExecStart= only (this checkout's venv instead of /usr/lib/opmas/venv; the same --config path),
another may shorten WatchdogSec= for the watchdog test. /etc/opmas, /var/lib/opmas and
/var/log/opmas (what ConfigurationDirectory=, StateDirectory= and LogsDirectory= name) are tmpfs
of the sandbox's own, so nothing lands in the host's tree; the checkout and its venv are bound
into the sandbox at their own paths when they live under /tmp or /run (a CI clone).
The embedded nats-server (the default) is this venv's; gRPC listens on a free port, REST is off.
opmasctl runs inside the sandbox, as root, over /run/opmas/opmasd.sock.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_fixtures import booted
from systemd_sandbox import SystemdSandbox

from .harness import free_port

pytestmark = pytest.mark.timeout(240)

CHECKOUT = Path(__file__).resolve().parents[2]
UNIT = CHECKOUT / "systemd" / "opmasd.service"
VENV = Path(sys.prefix)
PRIVATE = (Path("/etc/opmas"), Path("/var/lib/opmas"), Path("/var/log/opmas"))
SOCKET = "/run/opmas/opmasd.sock"
AGENTS_DIR = "/etc/opmas/agents.d"
WATCHDOG_SEC = 3


@pytest.fixture(scope="module")
def sd() -> Iterator[SystemdSandbox]:
    with booted(SystemdSandbox(shared=(CHECKOUT, VENV), private=PRIVATE)) as sandbox:
        install(sandbox)
        yield sandbox


def install(sd: SystemdSandbox) -> None:
    """The shipped unit, a drop-in naming this checkout's Python, and the configuration."""
    units = sd.host_path("/run/systemd/system")
    shutil.copyfile(UNIT, units / "opmasd.service")
    (units / "opmasd.service.d").mkdir()
    (units / "opmasd.service.d" / "checkout.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={sys.executable} -m opmasd --config /etc/opmas/opmasd.yaml\n"
    )
    config = {
        "service": {
            "log_level": "debug",
            "monitoring_interval": 0.5,
            "discovery_interval": 3600,
            # Agents are left running at a clean stop, for the next opmasd to adopt.
            "stop_agents_on_shutdown": False,
        },
        "grpc": {"address": f"127.0.0.1:{free_port()}"},
        "rest": {"enabled": False},
        "agents": {"dirs": [AGENTS_DIR], "backoff_initial": 0.1, "backoff_max": 0.5, "stop_timeout": 5},
    }
    sd.host_path(AGENTS_DIR).mkdir(parents=True, exist_ok=True)
    sd.host_path("/etc/opmas/opmasd.yaml").write_text(json.dumps(config))  # JSON is YAML
    sd.run("systemctl", "daemon-reload")


@pytest.fixture
def opmasd(sd: SystemdSandbox) -> Iterator[SystemdSandbox]:
    """opmasd started (returns once READY=1); stopped, its agents deleted, its drop-ins removed after."""
    sd.run("systemctl", "reset-failed", "opmasd", check=False)
    start(sd)
    yield sd
    if show(sd, "ActiveState")["ActiveState"] != "active":
        start(sd)
    listed = json.loads(ctl(sd, "-o", "json", "agents", "list").stdout or "{}")
    for agent in listed.get("agents", []):
        ctl(sd, "agents", "delete", agent["agentId"])
    sd.run("systemctl", "stop", "opmasd", check=False, timeout=120)
    extra = sd.host_path("/run/systemd/system/opmasd.service.d/test.conf")
    if extra.exists():
        extra.unlink()
        sd.run("systemctl", "daemon-reload")
    for package in sd.host_path(AGENTS_DIR).iterdir():
        shutil.rmtree(package)


def start(sd: SystemdSandbox) -> None:
    result = sd.run("systemctl", "start", "opmasd", check=False, timeout=60)
    assert result.returncode == 0, result.stderr + journal(sd)


def ctl(sd: SystemdSandbox, *args: str, timeout: float = 30.0) -> Any:
    """opmasctl inside the sandbox, as root, over the unit's unix socket (no token)."""
    argv = [sys.executable, "-m", "opmasctl", "--server", SOCKET, *args]
    return sd.run(*argv, check=False, timeout=timeout)


def show(sd: SystemdSandbox, *props: str, unit: str = "opmasd.service") -> dict[str, str]:
    out = sd.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(sd: SystemdSandbox, unit: str = "opmasd.service", lines: int = 80) -> str:
    out = sd.run("journalctl", "-u", unit, "-n", str(lines), "--no-pager", check=False).stdout
    return f"\n--- journal of {unit} ---\n{out}"


def agent(sd: SystemdSandbox, agent_id: str) -> dict[str, Any]:
    result = ctl(sd, "-o", "json", "agents", "get", agent_id)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.2)


def running(sd: SystemdSandbox, agent_id: str) -> dict[str, Any] | None:
    found = agent(sd, agent_id)
    return found if found["status"]["state"] == "AGENT_STATE_RUNNING" else None


def test_start_returns_once_ready_and_status_shows_the_counts(opmasd: SystemdSandbox) -> None:
    # `systemctl start` has returned (the fixture): Type=notify means READY=1 was sent, so the
    # socket answers now, with no retry.
    listed = ctl(opmasd, "agents", "list")
    assert listed.returncode == 0, listed.stderr + journal(opmasd)
    shown = show(opmasd, "ActiveState", "SubState", "Type", "StatusText", "MainPID", "NotifyAccess")
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running", shown
    assert shown["Type"] == "notify" and shown["NotifyAccess"] == "main", shown
    assert shown["StatusText"] == "0 agents, 0 running", shown
    status = opmasd.run("systemctl", "status", "--no-pager", "opmasd", check=False).stdout
    assert 'Status: "0 agents, 0 running"' in status, status
    # The directories systemd made and handed over, used as opmasd's defaults.
    for path in ("/var/lib/opmas/opmas.db", SOCKET):
        assert opmasd.host_path(path).exists(), path
    # Its log went to the journal through the native protocol: the event's keys are fields.
    out = opmasd.run("journalctl", "-u", "opmasd", "-o", "json", "--no-pager", check=False).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    ready = [e for e in entries if str(e.get("MESSAGE", "")).startswith("opmasd ready")]
    assert ready and ready[-1].get("AGENTS") == "0", journal(opmasd)
