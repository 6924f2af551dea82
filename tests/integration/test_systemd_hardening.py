"""The systemd runtime against a real systemd 252 where an outside check found it weak (issue 12):
argv after a daemon-reload, secrets in the unit, two opmasd on one systemd, daemon-reexec, a lost
bus connection. Each test fails on the code before the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
from systemd_sandbox import SystemdSandbox
from test_systemd_runtime import REPORT, SLEEPER, WAIT, Harness, agent, harness, work

from opmasd.core.errors import BackendError, LaunchError
from opmasd.core.model import ResourceLimits
from opmasd.runtime.systemd_dbus import SystemdManager
from opmasd.runtime.systemd_env import file_name
from opmasd.runtime.systemd_units import TransientUnit, escape_unit_name

__all__ = ["harness", "work"]  # the fixtures, shared with test_systemd_runtime

ARGV_REPORTER = (
    REPORT
    + """
report("argv-" + os.environ["ROUND"], sys.argv[1:])
time.sleep(1000)
"""
)
TRICKY_ARGS = ("$HOME", "%n", "100%", "${X}", "$$", "a b", "'q'", '"dq"', "back\\slash", ";")


async def test_argv_is_verbatim_and_the_unit_loads_after_a_daemon_reload(harness: Harness) -> None:
    """ExecStartEx= came back `bad-setting` after a reload; ExecStart expands `$VAR`."""
    agent_id = agent("reload")
    unit = escape_unit_name(agent_id)
    await harness.launch(agent_id, ARGV_REPORTER, *TRICKY_ARGS, environment={"ROUND": "1", "X": "x"})
    assert json.loads(await harness.file("argv-1")) == list(TRICKY_ARGS)
    harness.sd.run("systemctl", "daemon-reload")
    assert harness.show(unit, "LoadState") == "loaded"
    assert harness.show(unit, "ActiveState") == "active"
    # Stop and start (a new unit of the same name) still work, and the argv is still verbatim.
    await harness.runtime.terminate(agent_id, 5)
    assert len(harness.exits.of(agent_id)) == 1
    await harness.launch(agent_id, ARGV_REPORTER, *TRICKY_ARGS, environment={"ROUND": "2", "X": "x"})
    assert json.loads(await harness.file("argv-2")) == list(TRICKY_ARGS)
    harness.sd.run("systemctl", "daemon-reload")
    assert harness.show(unit, "LoadState") == "loaded"
    await harness.runtime.terminate(agent_id, 5)
    assert len(harness.exits.of(agent_id)) == 2


HOSTILE = {
    "SECRET": "s3cr3t-password",
    "DQ": 'a"b',
    "SQ": "a'b",
    "BS": "a\\b",
    "BS_END": "x\\",
    "DOLLAR": "$X",
    "BRACED": "${X}",
    "DOLLARS": "$$",
    "LEAD": " lead",
    "TRAIL": "trail ",
    "HASH": "#x",
    "SEMI": ";x",
    "NEWLINE": "line1\nline2",
    "CRLF": "a\r\nb",
    "ESCAPED_N": "a\\nb",
    "BACKTICK": "`id`",
    "TAB": "a\tb",
    "CTRL": "a\x01b",
    "EMPTY": "",
    "UNICODE": "é ✓",
    "EQUALS": "a=b=c",
}


async def test_the_environment_reaches_the_agent_byte_for_byte_and_stays_private(harness: Harness) -> None:
    """Environment= was readable by every local user (systemctl show, /run/systemd/transient)."""
    agent_id = agent("secret")
    unit = escape_unit_name(agent_id)
    body = REPORT + 'report("env", dict(os.environ))\ntime.sleep(1000)\n'
    await harness.launch(agent_id, body, environment=HOSTILE)
    seen = json.loads(await harness.file("env"))
    assert {key: seen.get(key) for key in HOSTILE} == HOSTILE
    assert "s3cr3t" not in harness.show(unit, "Environment")
    transient = harness.sd.host_path(f"/run/systemd/transient/{unit}").read_text()
    assert "s3cr3t" not in transient
    files = harness.show(unit, "EnvironmentFiles")
    path = harness.env_dir / file_name(unit)
    assert files.startswith(str(path))
    here = harness.sd.host_path(str(path))
    assert stat.S_IMODE(here.stat().st_mode) == 0o600 and here.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(here.parent.stat().st_mode) == 0o700
    await harness.runtime.terminate(agent_id, 5)
    assert not here.exists()  # removed once the unit is gone


async def test_environment_files_of_units_gone_are_swept_at_connect(harness: Harness) -> None:
    agent_id = agent("kept")
    await harness.launch(agent_id, SLEEPER)
    env_dir = harness.sd.host_path(str(harness.env_dir))
    kept = env_dir / file_name(escape_unit_name(agent_id))
    stale = env_dir / file_name("opmas-agent-gone.service")
    stale.write_text('SECRET="x"\n')
    await harness.runtime.aclose()
    second = harness.new_runtime()
    await second.connect()
    try:
        assert kept.exists() and not stale.exists()
        assert second.adopt(agent_id, None) is not None
        await second.terminate(agent_id, 5)
        assert not kept.exists()
    finally:
        await second.aclose()


async def test_two_opmasd_on_one_systemd_leave_each_others_units_alone(
    systemd_sandbox: SystemdSandbox, work: Path
) -> None:
    """A second opmasd adopted or stopped the first one's units as unclaimed."""
    first = Harness(systemd_sandbox, work)
    second = Harness(systemd_sandbox, work)
    await first.runtime.connect()
    agent_id = agent("owned")
    unit = escape_unit_name(agent_id)
    try:
        handle = await first.launch(agent_id, SLEEPER)
        await second.runtime.connect()
        assert second.runtime.adopt(agent_id, handle) is None
        assert not [line for line in await second.runtime.reap_unmanaged() if unit in line]
        assert first.show(unit, "ActiveState") == "active"
        [(field, why)] = second.runtime.id_refusals(agent_id)
        assert field == "id" and unit in why and first.instance in why
        with pytest.raises(LaunchError, match=rf"unit .*belongs to another opmasd.*{first.instance}"):
            await second.runtime.launch(second.request(agent_id, SLEEPER))
        assert first.show(unit, "ActiveState") == "active" and first.exits.reports == []
        # Units made before marks existed count as ours (the upgrade path).
        legacy_id = agent("legacy")
        legacy = first.new_runtime(instance="")
        await legacy.connect()
        try:
            await legacy.launch(first.request(legacy_id, SLEEPER))
        finally:
            await legacy.aclose()
        third = second.new_runtime()
        await third.connect()
        try:
            assert third.adopt(legacy_id, None) is not None
            await third.terminate(legacy_id, 5)
        finally:
            await third.aclose()
        await first.runtime.terminate(agent_id, 5)
        assert len(first.exits.of(agent_id)) == 1
    finally:
        await first.runtime.aclose()
        await second.runtime.aclose()


async def test_a_daemon_reexec_keeps_agents_running_and_watched(harness: Harness) -> None:
    stays, dies = agent("reexec-a"), agent("reexec-b")
    await harness.launch(stays, SLEEPER)
    died = await harness.launch(dies, SLEEPER)
    harness.sd.run("systemctl", "daemon-reexec")
    harness.sd.run("kill", "-KILL", str(died.pid))
    info = await harness.exits.wait(dies)
    assert info.signal == 9
    began = time.monotonic()
    await harness.runtime.terminate(stays, 5)
    assert time.monotonic() - began < 3
    assert len(harness.exits.of(stays)) == 1 and len(harness.exits.of(dies)) == 1
    # Launches while systemd re-executes: the calls it drops are sent again, none fails.
    argv = ["nsenter", "-t", str(harness.sd.pid), "-m", "-p", "-u", "-i", "-C", "systemctl", "daemon-reexec"]
    reexec = await asyncio.create_subprocess_exec(*argv)
    launched: list[str] = []
    async with asyncio.timeout(WAIT):
        while reexec.returncode is None or len(launched) < 3:
            launched.append(agent("reexec-c"))
            await harness.launch(launched[-1], "import time; time.sleep(1000)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reexec.wait(), 0.001)
    assert reexec.returncode == 0
    for agent_id in launched:
        await harness.runtime.terminate(agent_id, 5)
        assert len(harness.exits.of(agent_id)) == 1


async def test_a_lost_bus_is_reconnected_and_an_exit_meanwhile_is_reported_once(harness: Harness) -> None:
    """A lost connection was silent: agents stayed running with dead PIDs, stop hung."""
    runtime = harness.runtime
    runtime._reconnector.first_delay = 1.5  # room to act while disconnected
    lives, dies = agent("lost-a"), agent("lost-b")
    await harness.launch(lives, SLEEPER)
    died = await harness.launch(dies, SLEEPER)
    bus = runtime._manager._bus
    assert bus is not None
    bus.disconnect()  # as when the bus daemon goes away
    await asyncio.sleep(0.05)
    harness.sd.run("kill", "-KILL", str(died.pid))
    began = time.monotonic()
    with pytest.raises(LaunchError, match="not connected"):
        await runtime.launch(harness.request(agent("lost-c"), SLEEPER))
    with pytest.raises(BackendError, match="connection to systemd is lost"):
        await runtime.terminate(lives, 5)
    assert time.monotonic() - began < 1.0  # at once, not after every timeout
    info = await harness.exits.wait(dies, WAIT)
    assert (info.signal, info.cause) == (9, ""), info  # from the journal: systemd collected the unit
    assert runtime._reconnector.reconnects == 1
    await runtime.terminate(lives, 5)
    assert len(harness.exits.of(lives)) == 1 and len(harness.exits.of(dies)) == 1


async def test_a_restarted_bus_daemon_is_reconnected(harness: Harness) -> None:
    agent_id = agent("dbus")
    await harness.launch(agent_id, SLEEPER)
    harness.sd.run("systemctl", "restart", "dbus.service")
    async with asyncio.timeout(WAIT):
        while harness.runtime._reconnector.reconnects < 1:
            await asyncio.sleep(0.05)
    await harness.runtime.terminate(agent_id, 5)
    assert len(harness.exits.of(agent_id)) == 1


async def test_cpu_quota_below_one_percent_is_refused_since_systemd_enforces_one(
    harness: Harness, systemd_sandbox: SystemdSandbox
) -> None:
    """systemd writes the CFS quota as at least 1 ms (the kernel's minimum), stretching the period
    up to 1 s for it: 0.1% of a CPU at the least, whatever less the unit asks."""
    manager = SystemdManager(5)
    await manager.connect(systemd_sandbox.bus_address)
    unit = f"opmas-quota-{os.getpid()}.service"
    try:
        tiny = TransientUnit(("/bin/sleep", "30"), cpu_quota_per_sec_usec=100)  # 0.01%
        await manager.start_transient_unit(unit, tiny)
        group = (await manager.unit_state(unit)).control_group
        hierarchy = next(
            p for p in ("cpu", "cpu,cpuacct") if systemd_sandbox.host_path(f"/sys/fs/cgroup/{p}").is_dir()
        )
        quota = systemd_sandbox.host_path(f"/sys/fs/cgroup/{hierarchy}{group}/cpu.cfs_quota_us")
        period = quota.with_name("cpu.cfs_period_us")
        assert (int(quota.read_text()), int(period.read_text())) == (1000, 1_000_000)  # 0.1%, not 0.01%
    finally:
        await manager.stop_unit(unit)
        await manager.close()
    [(field, why)] = harness.runtime.refusals(ResourceLimits(cpu_quota_percent=0.0001))
    assert field == "resources.cpu_quota_percent" and "0.0001%" in why and "0.1%" in why
    assert harness.runtime.refusals(ResourceLimits(cpu_quota_percent=0.05)) != []
    assert harness.runtime.refusals(ResourceLimits(cpu_quota_percent=0.1)) == []
