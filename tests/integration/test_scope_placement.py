"""The launch gate of process-runtime agents in scopes, and a placement systemd refuses.

- The program waits at the gate: it runs only after "go", with /dev/null as its stdin; a gate
  closed without it (a daemon that died, a placement that failed) ends the child, exit 126.
- When the scope cannot be made (here: one of that name still holds processes), the launch
  fails with why, the child is killed and reaped, and its program never ran.

- A placement inside the sandbox (a scope takes PIDs of systemd's PID namespace): the child
  and a log relay each land in their scope, with the limits as the scope's properties, and the
  program runs only then — after a reconnection, when the bus connection had ended.

opmasd as a unit, restarted with its agents in scopes: tests/e2e/test_process_scopes.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from systemd_sandbox import SystemdSandbox

from opmasd.core.errors import LaunchError
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.process_scopes import ProcessScopes, ScopeManager
from opmasd.runtime.scope_cgroups import Gate, waiting_command


def gated(marker: Path) -> tuple[subprocess.Popen[bytes], Gate]:
    """A child that writes its stdin's first line (none: "eof") to marker once past the gate."""
    program = ("/bin/sh", "-c", 'read -r line || line=eof; echo "ran $line" > "$0"', str(marker))
    gate = Gate.open()
    popen = subprocess.Popen(waiting_command(program), stdin=gate.read, start_new_session=True)
    return popen, gate


def test_the_program_runs_after_go_with_no_stdin(tmp_path: Path) -> None:
    popen, gate = gated(tmp_path / "marker")
    time.sleep(0.1)  # it must still be waiting: nothing ran yet
    assert popen.poll() is None and not (tmp_path / "marker").exists()
    gate.go()
    gate.close()
    assert popen.wait(timeout=5) == 0
    assert (tmp_path / "marker").read_text() == "ran eof\n"  # the gate's pipe is not its stdin


def test_a_gate_closed_without_go_ends_the_child(tmp_path: Path) -> None:
    popen, gate = gated(tmp_path / "marker")
    gate.close()
    assert popen.wait(timeout=5) == 126
    assert not (tmp_path / "marker").exists()


@pytest.fixture
async def scopes(systemd_sandbox: SystemdSandbox) -> AsyncIterator[ProcessScopes]:
    manager = ScopeManager(timeout=5)
    await manager.connect(systemd_sandbox.bus_address)
    await manager.subscribe(prefix="opmas-")
    base = systemd_sandbox.host_path("/sys/fs/cgroup/unified/system.slice")
    made = ProcessScopes(manager, base, "system.slice", timeout=5)
    yield made
    await made.close()


async def test_a_scope_systemd_refuses_fails_the_launch_and_the_program_never_runs(
    scopes: ProcessScopes, systemd_sandbox: SystemdSandbox, tmp_path: Path
) -> None:
    sd = systemd_sandbox
    # A scope of the agent's name that still holds a process (an earlier run's, say).
    sd.run("sh", "-c", "systemd-run --scope --unit opmas-proc-busy sleep 300 >/dev/null 2>&1 &")
    try:
        deadline = time.monotonic() + 10
        state = ("systemctl", "is-active", "opmas-proc-busy.scope")
        while sd.run(*state, check=False).stdout.strip() != "active":
            assert time.monotonic() < deadline, "the busy scope did not start"
            await asyncio.sleep(0.05)
        request = LaunchRequest("busy", ("/bin/true",), "")
        assert scopes.gated(request)[0].command[-1] == "/bin/true"
        popen, gate = gated(tmp_path / "marker")
        notes: list[str] = []
        with pytest.raises(LaunchError, match="still has processes") as failed:
            await scopes.place("busy", popen, gate, lambda _agent, text: notes.append(text))
        assert "cannot move agent busy" in str(failed.value)
        assert popen.returncode is not None  # killed and reaped
        assert not (tmp_path / "marker").exists()  # the program never ran
        assert notes and "not started" in notes[0]
        assert scopes.cgroups.placing == set()
    finally:
        sd.run("systemctl", "stop", "opmas-proc-busy.scope", check=False)


PLACE_INSIDE = """
import asyncio, json, subprocess
from pathlib import Path
from opmasd.core.model import ResourceLimits
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.process_scopes import ProcessScopes, ScopeManager, procstat_cgroup

async def main():
    manager = ScopeManager(5)
    await manager.connect("system")
    await manager.subscribe(prefix="opmas-")
    base = Path("/sys/fs/cgroup/unified/system.slice")
    scopes = ProcessScopes(manager, base, "system.slice", 5, frozenset({"pids"}), bus="system")
    limits = ResourceLimits(tasks_max=7)
    request, gate = scopes.gated(LaunchRequest("probe", ("/bin/sleep", "300"), "", resources=limits))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    child = subprocess.Popen(request.command, stdin=gate.read, **quiet)
    relay = subprocess.Popen(["/bin/sleep", "300"], **quiet)
    scopes.relay_started(relay.pid)
    await manager.close()  # the connection ends: the placement connects again
    await scopes.place("probe", child, gate, print)
    await asyncio.sleep(0.2)  # past the gate: the shell has exec'd sleep
    cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\\0")[0].decode()
    print(json.dumps({"child": procstat_cgroup(child.pid), "relay": procstat_cgroup(relay.pid),
                      "relay_pid": relay.pid, "program": cmdline}))
    await scopes.close()

asyncio.run(main())
"""


def test_a_placement_moves_the_child_and_the_relay_before_the_program_runs(
    systemd_sandbox: SystemdSandbox,
) -> None:
    sd = systemd_sandbox
    try:
        result = sd.run(sys.executable, "-c", PLACE_INSIDE, timeout=60)
        placed = json.loads(result.stdout.strip().splitlines()[-1])
        assert placed["child"] == "/system.slice/opmas-proc-probe.scope", placed
        assert placed["relay"] == f"/system.slice/opmas-logrelay-{placed['relay_pid']}.scope", placed
        assert placed["program"] == "/bin/sleep", placed  # the gate opened after the move
        shown = sd.run("systemctl", "show", "opmas-proc-probe.scope", "-p", "TasksMax,ActiveState").stdout
        assert "TasksMax=7" in shown and "ActiveState=active" in shown, shown
    finally:
        sd.run("systemctl", "stop", "opmas-proc-probe.scope", "opmas-logrelay-*.scope", check=False)
