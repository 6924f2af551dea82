"""Resource limits and runtimes are enforced or refused, never stored and ignored (issue 12).

Under the process runtime, memory_max, cpu_quota and tasks_max are the agent's cgroup's to
enforce (runtime.cgroup_limits): where opmasd has those controllers, an agent over its memory
limit is killed; where it has not (cgroup v1 holds them, or no cgroup per agent), registering
such an agent is refused naming the field and why, and so is a manifest asking for it. The
open-files limit is an rlimit: always enforced. A runtime this daemon has no backend for is
refused too (here with agents.systemd: off; tests/e2e/test_systemd_runtime.py runs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Sandbox, sleeper, write_package

pytestmark = pytest.mark.timeout(120)

# An agent that takes 300 MB and holds it (what --memory-max 64M must stop).
HOG = [
    sys.executable,
    "-c",
    "import time; b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); time.sleep(1000)",
]


def opmasctl(box: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    return box.opmasctl(*args)


def test_a_memory_limit_is_enforced_or_refused_naming_the_field(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    result = opmasctl(
        box, "agents", "register", "--name", "hog", "--memory-max", "64M", "--start", "--", *HOG
    )
    if result.returncode != 0:
        # No memory controller for opmasd here: refused, naming the field and the way out.
        assert result.returncode == 1, result.stderr
        assert "resources.memory_max_bytes" in result.stderr, result.stderr
        assert "the process runtime cannot enforce it on this host" in result.stderr, result.stderr
        assert "runtime: systemd" in result.stderr
        listed = opmasctl(box, "-o", "json", "agents", "list")
        assert json.loads(listed.stdout)["agents"] == [], listed.stdout  # nothing stored
        return
    # Enforced: the agent is killed for its memory, never left holding 300 MB.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        agent = json.loads(opmasctl(box, "-o", "json", "agents", "get", "hog").stdout)
        if agent["status"].get("restartCount", 0) > 0 or agent["status"]["state"] in (
            "AGENT_STATE_ERROR",
            "AGENT_STATE_STOPPED",
        ):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"an agent over its 64M memory limit was not stopped: {agent}")


@pytest.mark.parametrize(
    ("flags", "field"),
    [(["--cpu-quota", "50"], "resources.cpu_quota_percent"), (["--tasks-max", "16"], "resources.tasks_max")],
)
def test_cpu_and_task_limits_are_enforced_or_refused(
    make_sandbox: Callable[..., Sandbox], flags: list[str], field: str
) -> None:
    box = make_sandbox()
    box.start()
    result = opmasctl(box, "agents", "register", "--name", "limited", *flags, "--start", "--", *sleeper())
    if result.returncode != 0:
        assert field in result.stderr and "cannot enforce" in result.stderr, result.stderr
    else:  # enforced: the limit is in the agent's cgroup
        agent = json.loads(opmasctl(box, "-o", "json", "agents", "get", "limited").stdout)
        pid = int(agent["status"]["pid"])
        cgroup = Path(f"/proc/{pid}/cgroup").read_text().split("0::", 1)[1].split("\n", 1)[0]
        base = next(
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - cgroup2 " in line
        )
        name = "cpu.max" if field.endswith("cpu_quota_percent") else "pids.max"
        value = (Path(base) / cgroup.lstrip("/") / name).read_text().split()[0]
        assert value == ("50000" if name == "cpu.max" else "16")


def test_a_manifest_asking_for_an_unavailable_runtime_is_refused_at_registration(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    box = make_sandbox(env={"OPMAS_AGENTS_SYSTEMD": "off"})
    box.start()
    manifest = {"name": "capped", "entrypoint": sleeper(), "runtime": "systemd"}
    folder = write_package(box.root / "pkgs", "capped", manifest)
    result = opmasctl(box, "agents", "register", "--manifest", str(folder / "agent.yaml"))
    assert result.returncode == 1, result.stderr
    assert "runtime: the systemd runtime is not available" in result.stderr, result.stderr
    # Found by discovery, it is reported and not registered.
    box.package("discovered-unit", manifest)
    report = opmasctl(box, "agents", "discover")
    assert "the systemd runtime is not available" in report.stdout + report.stderr, report
    assert "discovered-unit" not in opmasctl(box, "agents", "list").stdout


def test_the_systemd_runtime_is_refused_while_this_daemon_has_none(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    box = make_sandbox(env={"OPMAS_AGENTS_SYSTEMD": "off"})
    box.start()
    result = opmasctl(box, "agents", "register", "--name", "unit", "--runtime", "systemd", "--", *sleeper())
    assert result.returncode == 1, result.stderr
    assert "spec.runtime: the systemd runtime is not available: agents.systemd is off" in result.stderr
    # Nor can an agent be switched to it.
    assert opmasctl(box, "agents", "register", "--name", "plain", "--", *sleeper()).returncode == 0
    switched = opmasctl(box, "agents", "update", "plain", "--runtime", "systemd")
    assert switched.returncode == 1 and "the systemd runtime is not available" in switched.stderr


def test_the_open_files_limit_is_always_enforced(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    result = opmasctl(
        box, "agents", "register", "--name", "fds", "--open-files-max", "321", "--start", "--", *sleeper()
    )
    assert result.returncode == 0, result.stderr
    agent = json.loads(opmasctl(box, "-o", "json", "agents", "get", "fds").stdout)
    limits = Path(f"/proc/{agent['status']['pid']}/limits").read_text()
    assert any(line.startswith("Max open files") and "321" in line for line in limits.splitlines()), limits
