"""The agent packages that ship: valid manifests, discovered as the daemon discovers them."""

from __future__ import annotations

import sys
from pathlib import Path

from opmasd.core.model import RestartPolicy
from opmasd.manager.packages.manifest import load_manifest
from opmasd.manager.packages.scan import scan

PACKAGES = Path(__file__).resolve().parents[2] / "agents" / "packages"


def test_shipped_packages_are_discovered_without_errors() -> None:
    result = scan([PACKAGES])
    assert result.errors == []
    ids = {m.agent_id for m in result.manifests}
    assert ids == {"auth-failures", "device-liveness", "nats-shell-probe", "sysmon"}  # not _template


def test_detectors_wait_for_a_log_feed() -> None:
    for name in ("auth-failures", "device-liveness", "nats-shell-probe"):
        spec = load_manifest(PACKAGES / name).spec
        assert spec.autostart is False, name
        assert spec.restart_policy is RestartPolicy.ON_FAILURE, name
        assert spec.heartbeat_interval == 10.0, name
    assert load_manifest(PACKAGES / "sysmon").spec.autostart is True


def test_python_agents_run_as_modules_with_the_sdk_on_the_path() -> None:
    for name, module in (("auth-failures", "auth_failures"), ("device-liveness", "device_liveness")):
        spec = load_manifest(PACKAGES / name).spec
        assert spec.command == (sys.executable, "-m", module)
        paths = spec.env["PYTHONPATH"].split(":")
        assert str(PACKAGES / name) in paths
        assert str(PACKAGES.parent) in paths  # where opmas_agent lives


def test_the_template_is_a_valid_package() -> None:
    spec = load_manifest(PACKAGES / "_template").spec
    assert spec.command[1:] == ("-m", "my_agent")
