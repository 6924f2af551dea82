"""The shipped unit is valid for systemd 252 and keeps a tight sandbox (checked offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "opmasd.service"


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is needed to check systemd/opmasd.service (apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at this Python.
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(), flags=re.M)
    path = tmp_path / "opmasd.service"
    path.write_text(text)
    return path


def test_unit_verifies(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "opmasd.service" not in result.stderr, result.stderr


def test_unit_is_notify_with_watchdog_and_reload() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "StateDirectory=opmas",
    ):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, flags=re.M)


def test_unit_sandbox_exposure(unit_copy: Path) -> None:
    # The unit file states its score; a change that raises it must restate it (and stay <= 5.0).
    stated = re.search(r"exposure (\d+\.\d) \(OK\)", UNIT.read_text())
    assert stated, "systemd/opmasd.service must state its exposure score in a comment"
    assert float(stated.group(1)) <= 5.0, stated.group(0)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=70", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= float(stated.group(1)), result.stdout


def test_sysusers_and_tmpfiles_entries_apply(tmp_path: Path) -> None:
    """On an alternate root (a copy of this host's user database): the socket group, /etc/opmas/agents.d."""
    systemd = UNIT.parent
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        shutil.copyfile(f"/etc/{name}", tmp_path / "etc" / name)
    users = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "--dry-run", str(systemd / "opmas.sysusers")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert users.returncode == 0, users.stderr
    assert "opmas" in users.stderr + users.stdout or "opmas" in (tmp_path / "etc" / "group").read_text()
    files = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(systemd / "opmas.tmpfiles")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert files.returncode == 0 and not files.stderr, files.stderr
    assert (tmp_path / "etc" / "opmas" / "agents.d").is_dir()
