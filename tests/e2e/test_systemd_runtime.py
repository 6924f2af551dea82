"""The systemd runtime end to end (issue 12): opmasd on this machine runs agents as transient
units of a real systemd (booted in namespaces of its own: tests/systemd_sandbox.py), driven
through opmasctl like any agent.

- `--runtime systemd` makes a unit `opmas-agent-<id>.service` with the spec's limits as its
  properties; the agent's output is read from the journal, stdout and stderr told apart.
- An exit is opmasd's to act on (systemd never restarts a unit): on-failure starts a new unit.
- An agent over its MemoryMax is killed, and its status says it ran out of memory.
- Units outlive opmasd: a new opmasd adopts them, and a stop removes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from systemd_fixtures import until
from systemd_sandbox import SANDBOX_PYTHON, SystemdSandbox

from .harness import Sandbox, sleeper
from .systemd_driven import driven_box

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def box(make_sandbox: Callable[..., Sandbox], systemd_sandbox: SystemdSandbox) -> Iterator[Sandbox]:
    yield from driven_box(make_sandbox, systemd_sandbox)


def agent(box: Sandbox, agent_id: str) -> dict[str, Any]:
    result = box.opmasctl("-o", "json", "agents", "get", agent_id)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def unit_show(sd: SystemdSandbox, unit: str, *props: str) -> dict[str, str]:
    out = sd.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_an_agent_runs_as_a_unit_with_its_limits_and_its_logs(
    box: Sandbox, systemd_sandbox: SystemdSandbox
) -> None:
    script = 'echo "hello from $AGENT_ID"; echo "trouble" >&2; exec sleep 1000'
    result = box.opmasctl(
        "agents", "register", "--name", "unit-a", "--runtime", "systemd", "--memory-max", "64M",
        "--tasks-max", "32", "--start", "--", "/bin/sh", "-c", script,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status = until(lambda: (a := agent(box, "unit-a"))["status"]["state"] == "AGENT_STATE_RUNNING" and a)
    unit = "opmas-agent-unit\\x2da.service"
    shown = unit_show(systemd_sandbox, unit, "ActiveState", "MainPID", "MemoryMax", "TasksMax", "Restart")
    assert shown["ActiveState"] == "active", shown
    assert shown["MemoryMax"] == str(64 << 20) and shown["TasksMax"] == "32", shown
    assert shown["Restart"] == "no", shown  # opmasd's restart policy is the only one
    assert int(status["status"]["pid"]) == int(shown["MainPID"])

    def streams() -> dict[str, str]:
        out = box.opmasctl("-o", "json", "agents", "logs", "unit-a").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        found = {e.get("line"): e.get("stream") for e in entries}
        return found if {"hello from unit-a", "trouble"} <= set(found) else {}

    found = until(streams, what="both lines in the journal")
    assert found["hello from unit-a"] == "LOG_STREAM_STDOUT", found
    assert found["trouble"] == "LOG_STREAM_STDERR", found
    stopped = box.opmasctl("agents", "stop", "unit-a")
    assert stopped.returncode == 0, stopped.stderr
    assert agent(box, "unit-a")["status"]["state"] == "AGENT_STATE_STOPPED"
    until(lambda: unit_show(systemd_sandbox, unit, "ActiveState").get("ActiveState") in (None, "inactive"))


def test_a_crash_is_restarted_by_opmasd_in_a_new_unit(box: Sandbox, systemd_sandbox: SystemdSandbox) -> None:
    result = box.opmasctl(
        "agents", "register", "--name", "crasher", "--runtime", "systemd", "--restart-policy",
        "on-failure", "--start-seconds", "0.5", "--start", "--", "/bin/sh", "-c", "sleep 2; exit 3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = int(agent(box, "crasher")["status"]["pid"])
    restarted = until(lambda: (a := agent(box, "crasher"))["status"].get("restartCount", 0) >= 1 and a, 30)
    # opmasd restarted it, in a new unit of the same name: systemd restarted nothing.
    until(lambda: int(agent(box, "crasher")["status"].get("pid") or 0) not in (0, first), 10)
    shown = unit_show(systemd_sandbox, "opmas-agent-crasher.service", "NRestarts", "Restart")
    assert shown.get("NRestarts") in ("0", None) and shown.get("Restart") in ("no", None), shown
    assert restarted["status"]["restartCount"] >= 1


def test_an_agent_over_its_memory_limit_is_killed_and_says_why(box: Sandbox) -> None:
    hog = "b = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(1000)"
    result = box.opmasctl(
        "agents", "register", "--name", "hog", "--runtime", "systemd", "--memory-max", "32M",
        "--restart-policy", "never", "--", SANDBOX_PYTHON, "-c", hog,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    started = box.opmasctl("agents", "start", "hog")
    assert started.returncode != 0
    assert "killed by SIGKILL: out of memory (MemoryMax)" in started.stderr, started.stderr
    status = agent(box, "hog")["status"]
    assert status["state"] == "AGENT_STATE_ERROR" and "out of memory (MemoryMax)" in status["stateReason"], (
        status
    )


def test_units_outlive_opmasd_and_are_adopted(box: Sandbox, systemd_sandbox: SystemdSandbox) -> None:
    result = box.opmasctl(
        "agents", "register", "--name", "lasting", "--runtime", "systemd", "--start", "--", *sleeper()
    )
    assert result.returncode == 0, result.stderr
    before = until(lambda: (a := agent(box, "lasting"))["status"]["state"] == "AGENT_STATE_RUNNING" and a)
    box.restart(how="kill")  # opmasd dies; its units do not (they are not its children)
    after = until(lambda: (a := agent(box, "lasting"))["status"]["state"] == "AGENT_STATE_RUNNING" and a)
    assert after["status"]["pid"] == before["status"]["pid"]  # the same process, adopted
    shown = unit_show(systemd_sandbox, "opmas-agent-lasting.service", "MainPID")
    assert shown["MainPID"] == str(before["status"]["pid"])


def test_a_unit_runs_as_the_agent_s_user(box: Sandbox, systemd_sandbox: SystemdSandbox) -> None:
    result = box.opmasctl(
        "agents", "register", "--name", "unit-nobody", "--runtime", "systemd", "--user", "nobody",
        "--start", "--", *sleeper(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status = until(lambda: (a := agent(box, "unit-nobody"))["status"]["state"] == "AGENT_STATE_RUNNING" and a)
    unit = "opmas-agent-unit\\x2dnobody.service"
    assert unit_show(systemd_sandbox, unit, "User")["User"] == "nobody"
    proc = systemd_sandbox.run("cat", f"/proc/{status['status']['pid']}/status").stdout
    uid = next(line.split()[1] for line in proc.splitlines() if line.startswith("Uid:"))
    assert uid == systemd_sandbox.run("id", "-u", "nobody").stdout.strip()
