"""Agents keep only the capabilities their spec names, sandboxed (issue 12), driven through
opmasctl: under the process runtime (setpriv) and under the systemd runtime (unit properties,
in a systemd booted for the tests: tests/systemd_sandbox.py). What the process runtime cannot
enforce is refused at registration, naming the field; so is an unknown capability.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_sandbox import SystemdSandbox

from .harness import Sandbox, sleeper
from .systemd_driven import driven_box

pytestmark = pytest.mark.timeout(180)

NET_RAW = f"{1 << 13:016x}"  # CAP_NET_RAW's bit, as /proc/PID/status shows a set


def agent(box: Sandbox, agent_id: str) -> dict[str, Any]:
    result = box.opmasctl("-o", "json", "agents", "get", agent_id)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def running_pid(box: Sandbox, agent_id: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = agent(box, agent_id)["status"]
        if status["state"] == "AGENT_STATE_RUNNING":
            return int(status["pid"])
        time.sleep(0.2)
    raise AssertionError(f"{agent_id} is not running: {status}")


def proc_status(path: Path) -> dict[str, str]:
    fields = dict(line.split(":", 1) for line in path.read_text().splitlines())
    return {key: value.split()[0] for key, value in fields.items() if value.split()}


def test_the_process_runtime_gives_only_the_named_capabilities(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    done = box.opmasctl(
        "agents", "register", "--name", "pinger", "--user", "nobody", "--capability", "net_raw",
        "--sandbox", "no_new_privileges=yes", "--start", "--", *sleeper(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = proc_status(Path(f"/proc/{running_pid(box, 'pinger')}/status"))
    assert seen["Uid"] != "0" and seen["NoNewPrivs"] == "1", seen
    assert seen["CapEff"] == seen["CapBnd"] == seen["CapAmb"] == NET_RAW, seen
    shown = box.opmasctl("agents", "get", "pinger").stdout
    assert "CAP_NET_RAW" in shown and "no_new_privileges=yes" in shown, shown
    # None named: nothing changes under this runtime (its default).
    done = box.opmasctl("agents", "register", "--name", "plain", "--start", "--", *sleeper())
    assert done.returncode == 0, done.stderr
    assert proc_status(Path(f"/proc/{running_pid(box, 'plain')}/status"))["CapEff"] != "0" * 16
    for agent_id in ("pinger", "plain"):
        box.opmasctl("agents", "delete", agent_id)


def test_what_cannot_be_enforced_is_refused_naming_the_field(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    refused = box.opmasctl(
        "agents", "register", "--name", "boxed", "--sandbox", "protect_system=strict", "--", *sleeper()
    )
    assert refused.returncode == 1
    expected = (
        "spec.sandbox.protect_system: strict cannot be enforced by the process runtime; use runtime: systemd"
    )
    assert expected in refused.stderr, refused.stderr
    refused = box.opmasctl(
        "agents", "register", "--name", "flyer", "--capability", "CAP_FLY", "--", *sleeper()
    )
    assert refused.returncode == 1
    assert "spec.capabilities: 'CAP_FLY' is not a Linux capability" in refused.stderr, refused.stderr
    # And in a manifest.
    manifest = {"name": "tmp-boxed", "entrypoint": sleeper(), "sandbox": {"private_tmp": True}}
    folder = box.package("tmp-boxed", manifest)
    refused = box.opmasctl("agents", "register", "--manifest", str(folder / "agent.yaml"))
    assert refused.returncode == 1
    assert "sandbox.private_tmp: true cannot be enforced by the process runtime" in refused.stderr, (
        refused.stderr
    )


@pytest.fixture
def systemd_box(make_sandbox: Callable[..., Sandbox], systemd_sandbox: SystemdSandbox) -> Iterator[Sandbox]:
    yield from driven_box(make_sandbox, systemd_sandbox)


def unit_show(sd: SystemdSandbox, unit: str, *props: str) -> dict[str, str]:
    out = sd.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_manifest_s_capabilities_and_sandbox_become_unit_properties(
    systemd_box: Sandbox, systemd_sandbox: SystemdSandbox
) -> None:
    manifest = {
        "name": "unit-pinger",
        "entrypoint": sleeper(),
        "runtime": "systemd",
        "working_directory": "/",  # the package folder is under the host's /tmp, unseen inside
        "user": "nobody",
        "capabilities": ["net_raw"],
        "sandbox": {"protect_system": "strict", "private_devices": True},
        "autostart": True,
    }
    folder = systemd_box.package("unit-pinger", manifest)
    done = systemd_box.opmasctl("agents", "register", "--manifest", str(folder / "agent.yaml"), "--start")
    assert done.returncode == 0, done.stderr
    pid = running_pid(systemd_box, "unit-pinger")
    shown = unit_show(
        systemd_sandbox, "opmas-agent-unit\\x2dpinger.service", "CapabilityBoundingSet",
        "AmbientCapabilities", "ProtectSystem", "PrivateDevices", "PrivateTmp", "NoNewPrivileges",
    )  # fmt: skip
    assert shown == {
        "CapabilityBoundingSet": "cap_net_raw",
        "AmbientCapabilities": "cap_net_raw",
        "ProtectSystem": "strict",
        "PrivateDevices": "yes",
        "PrivateTmp": "yes",  # the defaults fill what the manifest leaves unset
        "NoNewPrivileges": "yes",
    }, shown
    seen = proc_status(systemd_sandbox.host_path(f"/proc/{pid}/status"))
    assert seen["CapEff"] == seen["CapAmb"] == NET_RAW, seen
    spec = agent(systemd_box, "unit-pinger")["spec"]
    assert spec["capabilities"] == ["CAP_NET_RAW"], spec
    shown_box = spec["sandbox"]  # strings are printed even empty; unset booleans are not
    assert shown_box["protectSystem"] == "strict" and shown_box["privateDevices"] is True, shown_box
    assert "privateTmp" not in shown_box and not shown_box.get("protectHome"), shown_box
    # An update changes them for the next start: no capability at all.
    done = systemd_box.opmasctl("agents", "update", "unit-pinger", "--no-capabilities")
    assert done.returncode == 0, done.stderr
    assert not agent(systemd_box, "unit-pinger")["spec"].get("capabilities")
