"""Agent manifests: the packages that ship are valid and discovered; broken ones are refused."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from opmasd.core.model import RestartPolicy
from opmasd.manager.packages.manifest import ManifestError, load_manifest
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


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path: Path) -> None:
    package = tmp_path / "twice"
    package.mkdir()
    manifest = "name: twice\nentrypoint: /bin/true\nstop_timeout: 5s\nstop_timeout: 1h\n"
    (package / "agent.yaml").write_text(manifest)
    with pytest.raises(ManifestError, match="duplicate key 'stop_timeout'"):
        load_manifest(package)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    # "Billion laughs": nine levels of nine aliases is 9**9 strings once expanded.
    levels = ['  - &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"  - &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    package = tmp_path / "laughs"
    package.mkdir()
    (package / "agent.yaml").write_text(
        "name: laughs\nentrypoint: [/bin/true]\nautostart:\n" + "\n".join(levels)
    )
    with pytest.raises(ManifestError, match=r"YAML aliases \(\*name\) are not accepted"):
        load_manifest(package)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("environment: {A: [1, 2]}", "environment: values must be strings, numbers or booleans"),
        ("id: [a, b]", "id: must be a string"),
        ("autostart: [x, y]", "autostart: must be true or false, got list"),
        (f"stop_timeout: {'9' * 5000}x", "got '" + "9" * 30),
    ],
)
def test_bad_values_are_refused_without_echoing_them_whole(tmp_path: Path, line: str, message: str) -> None:
    package = tmp_path / "bad"
    package.mkdir()
    (package / "agent.yaml").write_text(f"name: bad\nentrypoint: /bin/true\n{line}\n")
    with pytest.raises(ManifestError, match=re.escape(message)) as raised:
        load_manifest(package)
    assert len(str(raised.value)) < 400


def test_a_cpu_quota_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "quota"
    package.mkdir()
    (package / "agent.yaml").write_text("name: quota\nentrypoint: /bin/true\nresources: {cpu_quota: nan}\n")
    with pytest.raises(ManifestError, match=r"cpu_quota|percentage"):
        load_manifest(package)
