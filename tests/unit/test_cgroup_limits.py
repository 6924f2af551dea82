"""The process runtime's limits: written into the agent's cgroup where the controllers are
opmasd's, refused naming the field and why where they are not (runtime.cgroup_limits)."""

from __future__ import annotations

from pathlib import Path

from opmasd.core.model import ResourceLimits
from opmasd.runtime.cgroup_limits import CgroupLimits

ALL = ResourceLimits(memory_max_bytes=64 << 20, cpu_quota_percent=50, tasks_max=16, open_files_max=100)


def test_without_agent_cgroups_every_cgroup_limit_is_refused_and_the_rlimit_is_not() -> None:
    limits = CgroupLimits(None, "agents.cgroups is off")
    refused = dict(limits.refusals(ALL))
    assert set(refused) == {
        "resources.memory_max_bytes",
        "resources.cpu_quota_percent",
        "resources.tasks_max",
    }  # open_files_max is an rlimit: enforced anyway
    assert refused["resources.tasks_max"] == (
        "the process runtime cannot enforce it on this host: agents.cgroups is off; use runtime: "
        "systemd, or leave it unset"
    )
    assert limits.refusals(ResourceLimits(open_files_max=10)) == []


def test_a_controller_the_hierarchy_does_not_offer_is_named(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    limits = CgroupLimits(tmp_path)
    refused = dict(limits.refusals(ALL))
    assert (
        "the memory controller is not available to opmasd's cgroup" in refused["resources.memory_max_bytes"]
    )
    assert "the pids controller is not available" in refused["resources.tasks_max"]


def test_limits_are_written_and_unset_ones_go_back_to_none(tmp_path: Path) -> None:
    limits = CgroupLimits(None)
    limits.available = frozenset({"memory", "cpu", "pids"})
    limits.apply(tmp_path, ALL)
    assert (tmp_path / "memory.max").read_text() == str(64 << 20)
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"  # half a CPU
    assert (tmp_path / "pids.max").read_text() == "16"
    limits.apply(tmp_path, ResourceLimits(tasks_max=4))  # a later run with other limits
    assert (tmp_path / "memory.max").read_text() == "max"
    assert (tmp_path / "cpu.max").read_text() == "max 100000"
    assert (tmp_path / "pids.max").read_text() == "4"
    assert limits.refusals(ALL) == []
