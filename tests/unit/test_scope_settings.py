"""Process-runtime agents in systemd scopes: names, the scopes' cgroups, and where they are refused.

The scopes themselves, made by a real systemd, are tests/integration/test_scope_placement.py and
tests/e2e/test_process_scopes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opmasd.config.loading import ConfigError, load_config
from opmasd.config.schema import AgentsConfig
from opmasd.core.model import ResourceLimits
from opmasd.runtime import process_scopes
from opmasd.runtime.process_scopes import ProcessScopes
from opmasd.runtime.scope_cgroups import (
    ScopeCgroups,
    ScopeLimits,
    relay_scope_name,
    scope_controllers,
    scope_name,
    waiting_command,
)
from opmasd.systemd.process_scopes import connect_process_scopes


def test_scope_names_escape_the_id_as_systemd_escape_does() -> None:
    assert scope_name("sysmon") == "opmas-proc-sysmon.scope"
    assert scope_name("my-agent") == "opmas-proc-my\\x2dagent.scope"
    assert scope_name("a/b c") == "opmas-proc-a-b\\x20c.scope"
    assert relay_scope_name(4242) == "opmas-logrelay-4242.scope"
    with pytest.raises(ValueError, match="no valid scope name"):
        scope_name("x" * 250)
    with pytest.raises(ValueError):
        scope_name("")


def test_the_waiting_command_execs_the_program_only_after_the_gate() -> None:
    command = waiting_command(("/bin/echo", "$HOME", "a b"))
    assert command[:2] == ("/bin/sh", "-c")
    assert command[-3:] == ("/bin/echo", "$HOME", "a b")  # passed on as they are, never expanded
    assert "exec" in command[2] and "exit 126" in command[2]


def test_scope_cgroups_list_the_agents_of_their_scopes(tmp_path: Path) -> None:
    for name in (
        scope_name("alpha"),
        scope_name("my-agent"),
        scope_name("placing"),
        relay_scope_name(12),  # a relay is no agent
        "opmas-proc-bad\\xzz.scope",  # malformed escape: logged and skipped
        "opmas-proc-notascope.service",
        "other.scope",
    ):
        (tmp_path / name).mkdir()
    cgroups = ScopeCgroups(tmp_path)
    cgroups.placing.add("placing")  # its scope is being made: not to be reaped as unmanaged
    assert cgroups.agents() == ["alpha", "my-agent"]
    assert cgroups.path("my-agent") == tmp_path / "opmas-proc-my\\x2dagent.scope"
    # The scope is systemd's to remove: remove() leaves it.
    cgroups.remove("alpha")
    assert (tmp_path / scope_name("alpha")).is_dir()
    assert ScopeCgroups(tmp_path / "missing").agents() == []


async def test_no_scopes_outside_a_systemd_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_scopes, "own_cgroup", lambda: "/user.slice/session-3.scope")
    scopes, why = await ProcessScopes.connect("system")
    assert scopes is None and "does not run in a systemd service" in why and "session-3.scope" in why
    monkeypatch.setattr(process_scopes, "own_cgroup", lambda: "/")
    assert (await ProcessScopes.connect("system"))[0] is None


async def test_no_scopes_on_the_system_bus_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_scopes, "own_cgroup", lambda: "/system.slice/opmasd.service")
    monkeypatch.setattr(process_scopes.os, "geteuid", lambda: 1000)
    scopes, why = await ProcessScopes.connect("system")
    assert scopes is None and "not root" in why


async def test_no_scopes_when_the_bus_is_silent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(process_scopes, "own_cgroup", lambda: "/system.slice/opmasd.service")
    scopes, why = await ProcessScopes.connect(f"unix:path={tmp_path}/no-bus", timeout=1)
    assert scopes is None and "did not answer" in why


def test_limits_become_the_scopes_properties_where_systemd_has_the_controller() -> None:
    limits = ScopeLimits(frozenset({"memory", "cpu", "pids", "io"}))
    asked = ResourceLimits(memory_max_bytes=64 << 20, cpu_quota_percent=150, tasks_max=32)
    assert limits.refusals(asked) == []
    assert limits.properties(asked) == (
        ("MemoryMax", "t", 64 << 20),
        ("CPUQuotaPerSecUSec", "t", 1_500_000),
        ("TasksMax", "t", 32),
    )
    assert limits.properties(ResourceLimits(tasks_max=5)) == (("TasksMax", "t", 5),)
    assert limits.properties(ResourceLimits()) == ()
    # Without the controller, the limit is refused (naming the field and why), never ignored.
    partial = ScopeLimits(frozenset({"memory"}))
    refused = partial.refusals(asked)
    assert [field for field, _why in refused] == ["resources.cpu_quota_percent", "resources.tasks_max"]
    assert "systemd has no cpu controller" in refused[0][1]
    # A quota systemd would enforce as 0.1% (the kernel's 1 ms in its longest period) is refused.
    [(field, why)] = limits.refusals(ResourceLimits(cpu_quota_percent=0.05))
    assert field == "resources.cpu_quota_percent" and "0.05% is below what systemd can enforce" in why


def test_scope_controllers_come_from_cgroup2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory\n")
    found = scope_controllers(tmp_path)
    assert {"cpu", "memory"} <= found and "io" not in found
    assert scope_controllers(tmp_path / "missing") <= {"cpu", "memory", "pids"}  # v1 only, logged


def agents_config(**fields: object) -> AgentsConfig:
    return AgentsConfig(dirs=(), **fields)  # type: ignore[arg-type]


async def test_on_refuses_to_start_where_scopes_cannot_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_scopes, "own_cgroup", lambda: "/")
    with pytest.raises(ConfigError) as refused:
        await connect_process_scopes(agents_config(process_scopes="on"), "opmasd.yaml")
    assert refused.value.key == "agents.process_scopes"
    assert "does not run in a systemd service" in refused.value.reason
    # auto: agents stay in opmasd's cgroup, as before.
    assert await connect_process_scopes(agents_config(process_scopes="auto"), "opmasd.yaml") is None


async def test_scopes_need_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> str:
        raise AssertionError("not probed")

    monkeypatch.setattr(process_scopes, "own_cgroup", never)
    with pytest.raises(ConfigError) as refused:
        await connect_process_scopes(agents_config(process_scopes="on", cgroups="off"), "opmasd.yaml")
    assert refused.value.key == "agents.process_scopes" and "agents.cgroups is off" in refused.value.reason
    assert await connect_process_scopes(agents_config(cgroups="off"), "x") is None
    assert await connect_process_scopes(agents_config(process_scopes="off"), "x") is None


def test_the_setting_is_read_and_checked(tmp_path: Path) -> None:
    env = {"OPMAS_SERVICE_STATE_DIR": str(tmp_path), "OPMAS_AGENTS_PROCESS_SCOPES": "on"}
    assert load_config(None, env).agents.process_scopes == "on"
    assert load_config(None, {"OPMAS_SERVICE_STATE_DIR": str(tmp_path)}).agents.process_scopes == "auto"
    with pytest.raises(ConfigError, match="PROCESS_SCOPES: must be one of auto, on, off"):
        load_config(None, {**env, "OPMAS_AGENTS_PROCESS_SCOPES": "maybe"})
