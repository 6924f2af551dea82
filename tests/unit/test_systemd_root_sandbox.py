"""The clean-root sandbox's pure parts (tests/systemd_root_sandbox.py): the cache key, the boot
script's isolation, the package helpers. Booting it is tests/e2e/test_deb_package.py's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import systemd_root_sandbox as rs
from systemd_sandbox import CgroupMount


def test_the_cached_root_is_named_by_its_recipe() -> None:
    assert rs.tarball_path() == rs.tarball_path(()), "the same recipe must reuse its root"
    assert rs.tarball_path(("b", "a")) == rs.tarball_path(("a", "b")), "order is no change of recipe"
    assert rs.tarball_path(("nats-server",)) != rs.tarball_path(), "another package is another root"
    assert rs.tarball_path(("systemd",)) == rs.tarball_path(), "a package already in it changes nothing"
    assert rs.tarball_path().parent == Path("/var/cache/opmas-tests"), "the cache lives outside the clone"


def test_a_new_recipe_version_is_a_new_root(monkeypatch: pytest.MonkeyPatch) -> None:
    before = rs.tarball_path()
    monkeypatch.setattr(rs, "RECIPE_VERSION", rs.RECIPE_VERSION + 1)
    assert rs.tarball_path() != before


def test_the_boot_script_pivots_into_the_root_and_keeps_the_host_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    wants = root / "lib/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True)
    (wants / "systemd-sysctl.service").touch()
    (wants / "only-in-this-root.service").touch()
    mounts = [CgroupMount(Path("/sys/fs/cgroup/memory"), "cgroup", "memory")]
    script = rs.root_boot_script(tmp_path, root, mounts)
    inner = script.split('if [ "$1" = inner ]', 1)[1]
    assert "unshare --cgroup --pid --fork --mount --uts --ipc --net" in script  # its own ports
    assert "pivot_root . .oldroot" in inner and "umount -l /.oldroot" in inner
    # Every mount the inner part makes is under the root, before the pivot (none on the host's tree).
    before_pivot = inner.split("pivot_root", 1)[0]
    for line in before_pivot.splitlines():
        if line.strip().startswith("mount "):
            assert str(root) in line, f"a mount outside the root: {line}"
    assert "--rbind /dev" not in inner and "--rbind /sys" not in inner  # not the host's /dev or /sys
    assert f"mount -t tmpfs -o mode=755,size=1m tmpfs {root}/dev" in inner
    assert f"{tmp_path}/console.log {root}/dev/console" in inner
    assert f"mount -t cgroup -o memory cgroup {root}/sys/fs/cgroup/memory" in inner
    # Masks come from the root's own unit directories, journald kept.
    assert f"{root}/run/systemd/system/only-in-this-root.service" in inner
    assert f"{root}/run/systemd/system/systemd-sysctl.service" in inner
    assert "/run/systemd/system/systemd-journald.service" not in inner


@pytest.mark.parametrize(
    ("field", "names"),
    [
        (
            "python3.11, libc6 (>= 2.28), systemd | systemd-standalone-sysusers",
            ("libc6", "python3.11", "systemd"),
        ),
        ("adduser,python3:any (>= 3.11)", ("adduser", "python3")),
        ("", ()),
    ],
)
def test_depends_names(field: str, names: tuple[str, ...]) -> None:
    assert rs.depends_names(field) == names


@pytest.mark.parametrize("version", ["0.1.0", "1.2.9", "2.0.0~rc1", "3"])
def test_the_upgrade_version_is_higher_for_dpkg(version: str) -> None:
    upgrade = rs.higher(version)
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is not installed: cannot ask it to compare versions")
    result = subprocess.run(["dpkg", "--compare-versions", upgrade, "gt", version], check=False)
    assert result.returncode == 0, f"dpkg does not order {upgrade} after {version}"
