"""runtime.systemd_dbus against a real systemd 252, booted in namespaces (tests/systemd_sandbox.py).

States are awaited through the signals (PropertiesChanged, JobRemoved, UnitRemoved) the manager
delivers, never by polling systemd; `systemctl` inside the sandbox is only a second witness.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from systemd_sandbox import SANDBOX_PYTHON, SystemdSandbox

from opmasd.runtime import dbus_window
from opmasd.runtime.systemd_dbus import DISCONNECTED, NO_SUCH_UNIT, UNIT_EXISTS, SystemdError, SystemdManager
from opmasd.runtime.systemd_units import (
    UNIT_PATTERN,
    ChangeKind,
    TransientUnit,
    UnitChange,
    agent_id_from_unit,
    escape_unit_name,
)

WAIT = 15.0  # seconds for any awaited change; none should take more than a fraction of one
FIELDS = ("active_state", "sub_state", "main_pid", "exec_main_code", "exec_main_status", "result")


@dataclass
class Seen:
    """The changes of one unit so far, merged: the last value of every field a signal carried."""

    fields: dict[str, object] = field(default_factory=dict)
    kinds: list[ChangeKind] = field(default_factory=list)
    job_results: list[str] = field(default_factory=list)


class Changes:
    """Every UnitChange the manager delivers, merged per unit, awaited with `until`."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[UnitChange] = asyncio.Queue()
        self.units: dict[str, Seen] = {}

    async def until(self, unit: str, done: Callable[[Seen], bool], timeout: float = WAIT) -> Seen:
        seen = self.units.setdefault(unit, Seen())
        async with asyncio.timeout(timeout):
            while not done(seen):
                change = await self.queue.get()
                merged = self.units.setdefault(change.unit, Seen())
                merged.kinds.append(change.kind)
                if change.job_result is not None:
                    merged.job_results.append(change.job_result)
                for key in FIELDS:
                    if (value := getattr(change, key)) is not None:
                        merged.fields[key] = value
        return seen


@pytest.fixture
async def manager(systemd_sandbox: SystemdSandbox) -> AsyncIterator[SystemdManager]:
    client = SystemdManager(timeout=10)
    await client.connect(systemd_sandbox.bus_address)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def changes(manager: SystemdManager) -> Changes:
    watched = Changes()
    manager.add_listener(watched.queue.put_nowait)
    await manager.subscribe(prefix="opmas-agent-")
    return watched


def unique(agent: str) -> str:
    """A unit name of its own for each test: the sandbox lives for the whole session."""
    return escape_unit_name(f"{agent}-{uuid.uuid4().hex[:8]}")


def show(sd: SystemdSandbox, unit: str, prop: str) -> str:
    return str(sd.run("systemctl", "show", unit, "-p", prop, "--value").stdout).strip()


def running(seen: Seen) -> bool:
    f = seen.fields
    return f.get("active_state") == "active" and f.get("sub_state") == "running" and bool(f.get("main_pid"))


def ended(seen: Seen) -> bool:
    return seen.fields.get("active_state") in ("failed", "inactive") and ChangeKind.JOB_REMOVED in seen.kinds


async def test_a_transient_unit_runs_is_listed_measured_and_stopped(
    systemd_sandbox: SystemdSandbox, manager: SystemdManager, changes: Changes
) -> None:
    unit = unique("sleeper")
    await manager.start_transient_unit(
        unit, TransientUnit(("/bin/sleep", "1000"), description="sleeps", memory_max=64 << 20, tasks_max=16)
    )
    seen = await changes.until(unit, running)
    assert "done" in (await changes.until(unit, lambda s: bool(s.job_results))).job_results

    listed = {info.name: info for info in await manager.list_units_by_patterns([UNIT_PATTERN])}
    assert listed[unit].active_state == "active" and listed[unit].description == "sleeps"

    state = await manager.unit_state(unit)
    assert state.main_pid == seen.fields["main_pid"]
    assert (state.active_state, state.sub_state, state.load_state) == ("active", "running", "loaded")
    assert len(state.invocation_id) == 32
    assert state.memory_current is not None and state.memory_current > 0
    # CPUUsageNSec: what systemd has ([not set] -> None). On these hosts (cgroup v1, with cpu and
    # cpuacct mounted as two hierarchies) systemd 252 keeps it unset even with CPUAccounting=yes.
    cpu = show(systemd_sandbox, unit, "CPUUsageNSec")
    assert state.cpu_usage_nsec == (None if cpu == "[not set]" else int(cpu))
    assert show(systemd_sandbox, unit, "MemoryMax") == str(64 << 20)
    assert show(systemd_sandbox, unit, "TasksMax") == "16"

    await manager.stop_unit(unit)
    stopped = await changes.until(unit, ended)
    assert stopped.fields["active_state"] == "inactive"
    # SIGTERM from the stop: systemd counts that as a clean end of a service.
    assert (stopped.fields["exec_main_code"], stopped.fields["exec_main_status"]) == (2, signal.SIGTERM)
    assert stopped.fields["result"] == "success"
    await changes.until(unit, lambda s: ChangeKind.UNIT_REMOVED in s.kinds)


async def test_an_exit_status_arrives_before_the_unit_is_collected(
    manager: SystemdManager, changes: Changes
) -> None:
    unit = unique("exits")
    await manager.start_transient_unit(unit, TransientUnit(("/bin/sh", "-c", "exit 3")))
    failed = await changes.until(unit, ended)
    assert failed.fields["active_state"] == "failed"
    assert (failed.fields["exec_main_code"], failed.fields["exec_main_status"]) == (1, 3)  # CLD_EXITED, 3
    assert failed.fields["result"] == "exit-code"
    await changes.until(unit, lambda s: ChangeKind.UNIT_REMOVED in s.kinds)  # CollectMode=inactive-or-failed
    with pytest.raises(SystemdError) as caught:
        await manager.unit_state(unit)
    assert caught.value.name == NO_SUCH_UNIT


async def test_a_program_that_cannot_run_fails_its_start_job(
    manager: SystemdManager, changes: Changes
) -> None:
    unit = unique("missing")
    await manager.start_transient_unit(unit, TransientUnit(("/nonexistent/program",)))
    failed = await changes.until(unit, ended)
    assert failed.job_results == ["failed"]
    assert failed.fields["exec_main_status"] == 203  # systemd's EXIT_EXEC


def memory_on_cgroup2(sd: SystemdSandbox) -> bool:
    """Whether the sandbox's memory controller is on a cgroup2 hierarchy (systemd reads
    memory.events there and reports Result=oom-kill) rather than on cgroup v1."""
    for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        got = sd.run("cat", f"{mount}/cgroup.controllers", check=False)
        if got.returncode == 0 and "memory" in got.stdout.split():
            return True
    return False


async def test_the_memory_limit_bites(
    systemd_sandbox: SystemdSandbox, manager: SystemdManager, changes: Changes
) -> None:
    unit = unique("hog")
    hog = "x = b'a' * (200 << 20); import time; time.sleep(30)"  # writes every page of 200 MB
    # The distribution's Python: the sandbox has a /tmp of its own, where a checkout's venv (a
    # clean clone's, in CI) would not be.
    await manager.start_transient_unit(unit, TransientUnit((SANDBOX_PYTHON, "-c", hog), memory_max=32 << 20))
    killed = await changes.until(unit, ended)
    assert killed.fields["active_state"] == "failed"
    if memory_on_cgroup2(systemd_sandbox):
        assert killed.fields["result"] == "oom-kill"
    else:
        # cgroup v1 memory controller: the limit bites (memory.limit_in_bytes), the kernel's
        # memcg OOM killer SIGKILLs the program, but systemd 252 only learns of OOM kills from
        # cgroup2's memory.events: it reports a plain SIGKILL.
        assert killed.fields["result"] == "signal"
        assert (killed.fields["exec_main_code"], killed.fields["exec_main_status"]) == (2, signal.SIGKILL)
    kernel = systemd_sandbox.run("journalctl", "-k", "--no-pager", "-o", "cat", "--grep", "oom-kill:").stdout
    assert f"task_memcg=/{systemd_sandbox.base_dir.name}/system.slice/{unit}" in kernel


async def test_starting_a_unit_twice_is_unit_exists(manager: SystemdManager, changes: Changes) -> None:
    unit = unique("twice")
    await manager.start_transient_unit(unit, TransientUnit(("/bin/sleep", "1000")))
    await changes.until(unit, running)
    with pytest.raises(SystemdError) as caught:
        await manager.start_transient_unit(unit, TransientUnit(("/bin/sleep", "1000")))
    assert caught.value.name == UNIT_EXISTS
    assert unit in caught.value.text
    await manager.kill_unit(unit, "main", signal.SIGKILL)
    assert (await changes.until(unit, ended)).fields["result"] == "signal"


async def test_an_agent_id_that_needs_escaping_round_trips(
    systemd_sandbox: SystemdSandbox, manager: SystemdManager, changes: Changes
) -> None:
    agent_id = f"probe-1_x.y:z/ü {uuid.uuid4().hex[:6]}"
    unit = escape_unit_name(agent_id)
    escaped = systemd_sandbox.run("systemd-escape", agent_id).stdout.strip()
    assert unit == f"opmas-agent-{escaped}.service"
    await manager.start_transient_unit(unit, TransientUnit(("/bin/sleep", "1000")))
    await changes.until(unit, running)
    names = [info.name for info in await manager.list_units_by_patterns([UNIT_PATTERN], ["active"])]
    assert unit in names
    assert agent_id in {agent_id_from_unit(name) for name in names}
    assert show(systemd_sandbox, unit, "Id") == unit
    await manager.stop_unit(unit)
    await changes.until(unit, ended)


async def test_a_closed_connection_is_noticed_and_refuses_calls(systemd_sandbox: SystemdSandbox) -> None:
    client = SystemdManager(timeout=5)
    await client.connect(systemd_sandbox.bus_address)
    assert client.connected
    watcher = asyncio.ensure_future(client.wait_disconnected())
    await client.close()
    await asyncio.wait_for(watcher, WAIT)
    assert not client.connected
    with pytest.raises(SystemdError) as caught:
        await client.unit_state("init.scope")
    assert caught.value.name == DISCONNECTED


async def test_errors_are_systemd_errors(manager: SystemdManager) -> None:
    with pytest.raises(SystemdError) as caught:
        await manager.stop_unit("opmas-agent-never-started.service")
    assert caught.value.name == NO_SUCH_UNIT
    with pytest.raises(SystemdError) as caught:
        await manager.kill_unit("opmas-agent-never-started.service", "nobody")
    assert caught.value.name.startswith("org.freedesktop.")


def journal(sd: SystemdSandbox, unit: str) -> list[dict[str, str]]:
    out = sd.run("journalctl", "--no-pager", "-o", "json", "-u", unit, "_TRANSPORT=stdout").stdout
    return [json.loads(line) for line in out.splitlines()]


async def lines_of(sd: SystemdSandbox, unit: str, count: int) -> list[dict[str, str]]:
    """The unit's output lines, once journald has all of them (it reads the streams on its own)."""
    async with asyncio.timeout(WAIT):
        while len(entries := journal(sd, unit)) < count:
            await asyncio.sleep(0.05)
    return entries


async def test_the_journal_is_private_and_tells_stdout_from_stderr(
    systemd_sandbox: SystemdSandbox, manager: SystemdManager, changes: Changes
) -> None:
    # Plain StandardOutput=StandardError=journal: one stream, one priority, one identifier.
    plain = unique("plain")
    await manager.start_transient_unit(
        # The sleep: journald names the unit of a line (_SYSTEMD_UNIT) from its writer's cgroup,
        # which it cannot find once the writer is gone; `-u` would then miss the line.
        plain,
        TransientUnit(("/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; sleep 0.5")),
    )
    await changes.until(plain, ended)
    entries = await lines_of(systemd_sandbox, plain, 2)
    assert {e["MESSAGE"] for e in entries} == {"to-stdout", "to-stderr"}
    assert len({(e["_STREAM_ID"], e["PRIORITY"], e["SYSLOG_IDENTIFIER"]) for e in entries}) == 1
    script = ("/bin/sh", "-c", "echo to-stdout; echo '<3>looks-like-a-level'; echo to-stderr >&2; sleep 0.5")
    # systemd-cat --stderr-priority: two streams, stderr's at priority warning, no level prefixes.
    wrapped = unique("wrapped")
    cat = (
        "/usr/bin/systemd-cat",
        f"--identifier={wrapped}",
        "--stderr-priority=warning",
        "--level-prefix=false",
        "--",
    )
    await manager.start_transient_unit(wrapped, TransientUnit((*cat, *script)))
    await changes.until(wrapped, ended)
    by_message = {e["MESSAGE"]: e for e in await lines_of(systemd_sandbox, wrapped, 3)}
    assert by_message["to-stdout"]["PRIORITY"] == by_message["<3>looks-like-a-level"]["PRIORITY"] == "6"
    assert by_message["to-stderr"]["PRIORITY"] == "4"
    assert by_message["to-stdout"]["_STREAM_ID"] != by_message["to-stderr"]["_STREAM_ID"]
    assert {e["SYSLOG_IDENTIFIER"] for e in by_message.values()} == {wrapped}
    # Stored in the sandbox's own /run, never in the host's persistent journal.
    header = systemd_sandbox.run("journalctl", "--header").stdout
    assert "File path: /run/log/journal/" in header and "/var/log/journal" not in header
    assert not host_journal_files_since(systemd_sandbox.started_at)


def host_journal_files_since(started: float) -> list[Path]:
    host = Path("/var/log/journal")
    return [p for p in host.rglob("*") if p.stat().st_mtime >= started] if host.is_dir() else []


def test_the_sandbox_keeps_to_itself(systemd_sandbox: SystemdSandbox) -> None:
    for path in ("/tmp", "/run", "/sys/fs/cgroup"):
        assert os.stat(systemd_sandbox.host_path(path)).st_dev != os.stat(path).st_dev, path
    cgroup = Path(f"/proc/{systemd_sandbox.pid}/cgroup").read_text()
    assert f"/{systemd_sandbox.base_dir.name}" in cgroup  # its own cgroups, seen from the host
    # The units that would act on the host's files and kernel are masked, not run.
    for unit in ("systemd-tmpfiles-setup.service", "systemd-sysctl.service", "systemd-sysusers.service"):
        assert show(systemd_sandbox, unit, "LoadState") == "masked", unit
        assert show(systemd_sandbox, unit, "ActiveState") == "inactive", unit


@pytest.mark.parametrize("buffer", ["as granted to root", "small, as without CAP_NET_ADMIN"])
async def test_many_large_calls_at_once_keep_the_connection(
    systemd_sandbox: SystemdSandbox, buffer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dbus-fast takes a send() that finds the socket's buffer full (EAGAIN) for a dead
    # connection: 100 agents started at once lost the bus. 64 calls of ~100 KB each (a spec may
    # be 128 KiB) in flight together are far more than a socket's buffer. The shipped unit has
    # no CAP_NET_ADMIN, so its buffer is the system's default: the calls must wait their turn.
    if buffer.startswith("small"):
        monkeypatch.setattr(dbus_window, "_SO_SNDBUFFORCE", socket.SO_SNDBUF)
        monkeypatch.setattr(dbus_window, "WANTED_BUFFER", 64 << 10)
    manager = SystemdManager(timeout=20)
    await manager.connect(systemd_sandbox.bus_address)
    changes = Changes()
    manager.add_listener(changes.queue.put_nowait)
    await manager.subscribe(prefix="opmas-agent-")
    argv = ("/bin/true", *(f"{i}:" + "x" * 8000 for i in range(12)))
    units = [unique("burst") for _ in range(64)]
    await asyncio.gather(*(manager.start_transient_unit(u, TransientUnit(argv)) for u in units))
    try:
        assert manager.connected
        for unit in units:
            await changes.until(unit, lambda s: bool(s.job_results))
    finally:
        await manager.close()
