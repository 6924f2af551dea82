"""Whole process trees under cgroups, with real processes: nothing an agent starts outlives it.

Each test runs a ProcessRuntime with a cgroup per agent (the default wherever opmasd may create
cgroups, as on the machines this project is tested on) and checks with the kernel's own view
(/proc and the cgroup) that new sessions, double forks and reparented processes are gone when
an agent is stopped, exits by itself, or was left behind by a daemon that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from opmasd.core.errors import LaunchError
from opmasd.core.model import ExitInfo, ProcessHandle
from opmasd.runtime import procstat
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.cgroups import AgentCgroups
from opmasd.runtime.process import ProcessRuntime

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# The leader starts a classic double fork whose grandchild lands in a new session, reparented
# away from the agent, and prints that grandchild's PID.
DOUBLE_FORK = "(setsid sh -c 'echo $$ > \"$0\"; exec sleep 3602' {pidfile} &) ; {rest}"


@pytest.fixture
def cgroups(tmp_path: Path) -> Iterator[AgentCgroups]:
    found, why = AgentCgroups.detect(tmp_path / "state")
    if found is None:
        pytest.skip(f"no cgroup per agent on this host: {why}")
    yield found
    for agent_id in found.agents():  # a failed test must not leave processes or cgroups
        found.kill(agent_id)
        deadline = time.monotonic() + 2
        while found.populated(agent_id) and time.monotonic() < deadline:
            time.sleep(0.01)
        found.remove(agent_id)
    found.close()


class Exits:
    def __init__(self) -> None:
        self.reports: list[tuple[str, ProcessHandle, ExitInfo]] = []
        self.event = asyncio.Event()

    def __call__(self, agent_id: str, handle: ProcessHandle, info: ExitInfo) -> None:
        self.reports.append((agent_id, handle, info))
        self.event.set()

    async def wait(self) -> ExitInfo:
        await asyncio.wait_for(self.event.wait(), 10)
        return self.reports[-1][2]


@pytest.fixture
async def runtime(tmp_path: Path, cgroups: AgentCgroups) -> AsyncIterator[tuple[ProcessRuntime, Exits]]:
    exits = Exits()
    rt = ProcessRuntime(tmp_path / "logs", cgroups=cgroups)
    rt.set_exit_handler(exits)
    yield rt, exits
    await rt.aclose()


async def launch(rt: ProcessRuntime, agent_id: str, script: str) -> ProcessHandle:
    return await rt.launch(LaunchRequest(agent_id, ("sh", "-c", script), "", dict(os.environ)))


def alive(pid: int) -> bool:
    stat = procstat.read(pid)
    return stat is not None and not stat.zombie


async def eventually(check: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def read_pid(path: Path) -> Callable[[], int | None]:
    def read() -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        return None

    return read


async def test_a_double_fork_does_not_survive_a_stop(
    runtime: tuple[ProcessRuntime, Exits], cgroups: AgentCgroups, tmp_path: Path
) -> None:
    rt, exits = runtime
    pidfile = tmp_path / "grandchild"
    handle = await launch(rt, "a", DOUBLE_FORK.format(pidfile=pidfile, rest="exec sleep 60"))
    await eventually(read_pid(pidfile))
    grandchild = read_pid(pidfile)()
    assert grandchild is not None and alive(grandchild)
    assert procstat.read(grandchild).sid != handle.pid  # type: ignore[union-attr]  # escaped the session
    await asyncio.wait_for(rt.terminate("a", 2), 5)
    # Verified before the exit was reported, not eventually.
    assert not alive(grandchild) and not alive(handle.pid)
    assert not cgroups.path("a").exists()
    assert len(exits.reports) == 1


async def test_an_agent_that_exits_by_itself_takes_its_escaped_children_along_and_names_them(
    runtime: tuple[ProcessRuntime, Exits], cgroups: AgentCgroups, tmp_path: Path
) -> None:
    rt, exits = runtime
    pidfile = tmp_path / "grandchild"
    wait_for_it = f"while [ ! -s {pidfile} ]; do sleep 0.01; done; exit 3"
    await launch(rt, "a", DOUBLE_FORK.format(pidfile=pidfile, rest=wait_for_it))
    info = await exits.wait()
    grandchild = read_pid(pidfile)()
    assert grandchild is not None
    assert not alive(grandchild), "the exit was reported while a process of the agent still ran"
    assert info.exit_code == 3
    assert len(info.leftovers) == 1 and info.leftovers[0].startswith(f"{grandchild} sleep 3602")
    assert f"killed 1 leftover process(es): {grandchild} sleep 3602" in info.reason
    assert not cgroups.path("a").exists()


SIGNAL_COUNTER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    out, role = sys.argv[1], sys.argv[2]
    def on_term(*_):
        with open(out, "a") as f:
            f.write(f"{role} TERM\\n")
        time.sleep(0.3)  # a teardown: a second SIGTERM meanwhile would be counted too
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    if role == "leader":
        me = [sys.executable, "-c", sys.argv[3], out]
        subprocess.Popen([*me, "child", sys.argv[3]])
        subprocess.Popen([*me, "session", sys.argv[3]], start_new_session=True)
    with open(out, "a") as f:
        f.write(f"{role} up\\n")
    while True:
        time.sleep(1)
    """
)


@pytest.mark.parametrize("begun", [False, True], ids=["terminate", "begin_terminate-then-terminate"])
async def test_each_process_of_the_tree_gets_exactly_one_sigterm_and_finishes_its_teardown(
    runtime: tuple[ProcessRuntime, Exits], tmp_path: Path, begun: bool
) -> None:
    rt, exits = runtime
    out = tmp_path / "signals"
    argv = (PY, "-c", SIGNAL_COUNTER, str(out), "leader", SIGNAL_COUNTER)
    await rt.launch(LaunchRequest("a", argv, "", dict(os.environ)))
    await eventually(lambda: out.exists() and out.read_text().count(" up") == 3)
    if begun:  # a bulk stop's sweep: the group's SIGTERM now, the rest of the stop after
        rt.begin_terminate("a")
        await eventually(lambda: "leader TERM" in out.read_text())
    await asyncio.wait_for(rt.terminate("a", 5), 8)
    lines = out.read_text().splitlines()
    assert sorted(line for line in lines if line.endswith("TERM")) == [
        "child TERM",
        "leader TERM",
        "session TERM",
    ]
    info = exits.reports[-1][2]
    assert info.leftovers == (), "children that finished their teardown within the stop timeout were killed"


async def test_sigkill_after_the_timeout_reaches_the_whole_tree(
    runtime: tuple[ProcessRuntime, Exits], tmp_path: Path
) -> None:
    rt, exits = runtime
    pidfile = tmp_path / "grandchild"
    # The leader ignores TERM before the grandchild says it is there (the pidfile the test waits
    # for), or a loaded machine could deliver the SIGTERM before the leader's trap was set.
    stubborn = (
        "trap '' TERM;"
        ' (setsid sh -c \'trap "" TERM; echo $$ > "$0"; while :; do sleep 1; done\' {pidfile} &);'
        " while :; do sleep 1; done"
    )
    handle = await launch(rt, "a", stubborn.format(pidfile=pidfile))
    await eventually(read_pid(pidfile))
    grandchild = read_pid(pidfile)()
    assert grandchild is not None
    started = time.monotonic()
    await asyncio.wait_for(rt.terminate("a", 0.3), 5)
    assert time.monotonic() - started < 3
    assert not alive(handle.pid) and not alive(grandchild)
    assert exits.reports[-1][2].signal == signal.SIGKILL


# --- a daemon that dies: what it launched is found, adopted or stopped -----------------------

DAEMON_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from opmasd.runtime.base import LaunchRequest
    from opmasd.runtime.cgroups import AgentCgroups
    from opmasd.runtime.process import ProcessRuntime

    async def main():
        runtime = ProcessRuntime(Path(sys.argv[1]), cgroups=AgentCgroups(Path(sys.argv[2])))
        runtime.set_exit_handler(lambda *args: None)
        handles = {}
        for agent_id in sys.argv[3:]:
            handle = await runtime.launch(LaunchRequest(agent_id, ("sleep", "60"), "", dict(os.environ)))
            handles[agent_id] = handle.pid
        print("PIDS", json.dumps(handles), flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def daemon_that_dies(tmp_path: Path, cgroups: AgentCgroups, *agent_ids: str) -> dict[str, int]:
    """Launch agents from a second process, then kill -9 it before anything was recorded."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [PY, "-c", DAEMON_SCRIPT, str(tmp_path / "logs"), str(cgroups.base), *agent_ids]
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert daemon.stdout is not None
    try:
        for line in daemon.stdout:
            if line.startswith(b"PIDS "):
                pids = {k: int(v) for k, v in json.loads(line.removeprefix(b"PIDS ")).items()}
                break
        else:
            raise AssertionError("the daemon ended without launching")
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()
    # Each child joins its cgroup itself, a moment after the spawn returned, then execs the
    # program (cgroups.joining_command).
    deadline = time.monotonic() + 5
    while any(
        pid not in cgroups.members(agent_id) or not procstat.command_line(pid).startswith("sleep")
        for agent_id, pid in pids.items()
    ):
        assert time.monotonic() < deadline, "the agents never joined their cgroups"
        time.sleep(0.005)
    return pids


async def test_a_process_whose_launch_was_never_recorded_is_found_and_adopted(
    runtime: tuple[ProcessRuntime, Exits], cgroups: AgentCgroups, tmp_path: Path
) -> None:
    rt, exits = runtime
    pids = daemon_that_dies(tmp_path, cgroups, "a")
    found = rt.adopt("a", None)
    assert found is not None and found.pid == pids["a"]
    assert procstat.same_start(found.start_time, procstat.read(pids["a"]).start_time)  # type: ignore[union-attr]
    await rt.terminate("a", 2)
    assert not alive(pids["a"])
    assert len(exits.reports) == 1


async def test_processes_nobody_claims_are_killed_and_reported(
    runtime: tuple[ProcessRuntime, Exits], cgroups: AgentCgroups, tmp_path: Path
) -> None:
    rt, _ = runtime
    pids = daemon_that_dies(tmp_path, cgroups, "kept", "ghost")
    assert rt.adopt("kept", None) is not None
    reports = await rt.reap_unmanaged()
    assert reports == [f"agent ghost: killed 1 unmanaged process(es): {pids['ghost']} sleep 60"]
    assert not alive(pids["ghost"]) and alive(pids["kept"])
    assert not cgroups.path("ghost").exists() and cgroups.path("kept").exists()
    await rt.terminate("kept", 2)


async def test_a_recorded_process_that_died_has_its_leftovers_killed(
    runtime: tuple[ProcessRuntime, Exits], cgroups: AgentCgroups, tmp_path: Path
) -> None:
    rt, _ = runtime
    pids = daemon_that_dies(tmp_path, cgroups, "a")
    handle = ProcessHandle(pids["a"], procstat.read(pids["a"]).start_time)  # type: ignore[union-attr]
    # A child the agent had, as if the leader died while no daemon ran: the cgroup keeps it.
    orphan = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
        ["sh", "-c", f"echo 0 > {cgroups.path('a')}/cgroup.procs; exec sleep 61"]
    )
    await eventually(lambda: orphan.pid in cgroups.members("a"))
    os.kill(pids["a"], signal.SIGKILL)
    await eventually(lambda: not alive(pids["a"]))
    assert rt.adopt("a", handle) is None
    await eventually(lambda: orphan.poll() is not None)
    assert await rt.reap_unmanaged() == []
    assert not cgroups.path("a").exists()


def test_process_identity_is_the_boot_relative_start_time() -> None:
    """Not psutil's create_time (boot time + ticks, which a wall-clock step moves)."""
    proc = subprocess.Popen(["sleep", "5"])
    try:
        stat = procstat.read(proc.pid)
        assert stat is not None
        assert 0 < stat.start_time <= time.clock_gettime(time.CLOCK_BOOTTIME)
        assert abs(psutil.Process(proc.pid).create_time() - psutil.boot_time() - stat.start_time) < 0.05
    finally:
        proc.kill()
        proc.wait()


async def test_launch_failures_are_told_before_the_spawn_as_without_cgroups(
    runtime: tuple[ProcessRuntime, Exits], cgroups: AgentCgroups, tmp_path: Path
) -> None:
    rt, exits = runtime
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program\n")
    script = tmp_path / "script"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    cases = {
        "no-such-program-xyz": "program 'no-such-program-xyz' not found",
        str(plain): "is not executable (permission denied)",
        str(script): "its script interpreter '/no/such/interpreter' is missing",
    }
    for program, message in cases.items():
        with pytest.raises(LaunchError, match=re.escape(message)):
            await rt.launch(LaunchRequest("bad", (program,), "", dict(os.environ)))
    assert exits.reports == [] and cgroups.members("bad") == []
