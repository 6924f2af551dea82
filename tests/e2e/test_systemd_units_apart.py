"""The systemd runtime end to end where an outside check found it weak (issue 12): two opmasd on
one systemd keep to their own units, an agent's secrets are not in its unit, an id too long for
a unit name is refused at registration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from systemd_sandbox import SystemdSandbox

from .harness import Sandbox, sleeper
from .systemd_driven import delete_all, systemd_env
from .test_systemd_runtime import agent, unit_show, until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def boxes(
    make_sandbox: Callable[..., Sandbox], systemd_sandbox: SystemdSandbox
) -> Iterator[tuple[Sandbox, Sandbox]]:
    first = make_sandbox(name="first", env=systemd_env(systemd_sandbox))
    second = make_sandbox(name="second", env=systemd_env(systemd_sandbox))
    first.start()
    yield first, second
    for box in (first, second):
        if box.daemons and box.daemons[-1].running:
            delete_all(box)


def test_two_opmasd_on_one_systemd_leave_each_others_units_alone(
    boxes: tuple[Sandbox, Sandbox], systemd_sandbox: SystemdSandbox
) -> None:
    first, second = boxes
    result = first.opmasctl("agents", "register", "--name", "apart", "--runtime", "systemd", "--start",
                            "--", *sleeper())  # fmt: skip
    assert result.returncode == 0, result.stderr
    before = until(lambda: (a := agent(first, "apart"))["status"]["state"] == "AGENT_STATE_RUNNING" and a)
    unit = "opmas-agent-apart.service"
    instance = (first.state_dir / "instance-id").read_text().strip()
    assert (
        unit_show(systemd_sandbox, unit, "Description")["Description"]
        == f"OPMAS agent apart (opmasd {instance})"
    )
    # The second opmasd starts (recovery, the unclaimed units' sweep) and leaves the unit alone.
    second.start()
    second.restart(how="kill")
    refused = second.opmasctl(
        "agents", "register", "--name", "apart", "--runtime", "systemd", "--", *sleeper()
    )
    assert refused.returncode != 0
    assert "spec.id" in refused.stderr and unit in refused.stderr, refused.stderr
    assert f"belongs to another opmasd on this systemd (instance {instance})" in refused.stderr
    shown = unit_show(systemd_sandbox, unit, "ActiveState", "MainPID")
    assert shown["ActiveState"] == "active" and shown["MainPID"] == str(before["status"]["pid"])
    assert agent(first, "apart")["status"]["state"] == "AGENT_STATE_RUNNING"


def test_the_agents_secrets_are_not_in_its_unit(
    make_sandbox: Callable[..., Sandbox], systemd_sandbox: SystemdSandbox
) -> None:
    box = make_sandbox(env=systemd_env(systemd_sandbox))
    box.start()
    try:
        script = 'echo "token=$API_TOKEN nats=${NATS_PASSWORD:+set}"; exec sleep 1000'
        result = box.opmasctl("agents", "register", "--name", "secretive", "--runtime", "systemd", "--env",
                              "API_TOKEN=hunter2 $HOME", "--start", "--", "sh", "-c", script)  # fmt: skip
        assert result.returncode == 0, result.stderr
        until(lambda: agent(box, "secretive")["status"]["state"] == "AGENT_STATE_RUNNING")
        unit = "opmas-agent-secretive.service"
        shown = unit_show(systemd_sandbox, unit, "Environment", "EnvironmentFiles")
        assert "hunter2" not in shown["Environment"] and "NATS" not in shown["Environment"], shown
        assert str(box.runtime_dir / "systemd-env") in shown["EnvironmentFiles"], shown
        transient = systemd_sandbox.host_path(f"/run/systemd/transient/{unit}").read_text()
        assert "hunter2" not in transient

        def said() -> str:
            out = box.opmasctl("-o", "json", "agents", "logs", "secretive").stdout
            lines = [json.loads(line).get("line", "") for line in out.splitlines() if line.strip()]
            return next((line for line in lines if line.startswith("token=")), "")

        assert until(said, what="the agent's line") == "token=hunter2 $HOME nats=set"
    finally:
        delete_all(box)


def test_an_id_too_long_for_a_unit_name_is_refused_at_registration(
    make_sandbox: Callable[..., Sandbox], systemd_sandbox: SystemdSandbox
) -> None:
    box = make_sandbox(env=systemd_env(systemd_sandbox))
    box.start()
    long_id = "a" + "-" * 62  # 63 characters; each '-' is 4 in a unit name (\x2d)
    result = box.opmasctl("agents", "register", "--name", "long", "--id", long_id, "--runtime", "systemd",
                          "--", *sleeper())  # fmt: skip
    assert result.returncode != 0
    assert "spec.id" in result.stderr and "unit name of 269 characters (max 255)" in result.stderr, (
        result.stderr
    )
    assert box.opmasctl("agents", "get", long_id).returncode != 0  # not registered
