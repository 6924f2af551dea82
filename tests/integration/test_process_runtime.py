"""ProcessRuntime against real child processes: launch, exit detection, terminate, adopt, logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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
from opmasd.core.logs import LogStream
from opmasd.core.model import ExitInfo, ProcessHandle, ResourceLimits
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.logfiles import parse_entry
from opmasd.runtime.process import ProcessRuntime

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# A leader that optionally ignores SIGTERM and starts a grandchild that always ignores it, in
# the leader's process group or (setsid) in a session of its own.
FAMILY_SCRIPT = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    if sys.argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; exec sleep 60"], start_new_session=sys.argv[2] == "setsid"
    )
    print("grandchild", grandchild.pid, flush=True)
    time.sleep(60)
    """
)

TICKER = textwrap.dedent(
    """
    import itertools, time
    for i in itertools.count():
        print("tick", i, flush=True)
        time.sleep(0.02)
    """
)


class Exits:
    """The exit handler of the tests: records every report and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, ProcessHandle, ExitInfo]] = []
        self._events: dict[str, asyncio.Event] = {}

    def __call__(self, agent_id: str, handle: ProcessHandle, info: ExitInfo) -> None:
        self.reports.append((agent_id, handle, info))
        self._event(agent_id).set()

    def _event(self, agent_id: str) -> asyncio.Event:
        return self._events.setdefault(agent_id, asyncio.Event())

    async def wait(self, agent_id: str) -> ExitInfo:
        await asyncio.wait_for(self._event(agent_id).wait(), 5)
        return [info for aid, _, info in self.reports if aid == agent_id][-1]

    def count(self, agent_id: str) -> int:
        return sum(1 for aid, _, _ in self.reports if aid == agent_id)


class Harness:
    def __init__(self, log_dir: Path, pids: list[int], **kwargs: int) -> None:
        self.log_dir = log_dir
        self.exits = Exits()
        self.runtime = ProcessRuntime(log_dir, **kwargs)
        self.runtime.set_exit_handler(self.exits)
        self.agents: set[str] = set()
        self._pids = pids

    async def launch(
        self,
        agent_id: str,
        *argv: str,
        working_directory: str = "",
        resources: ResourceLimits = ResourceLimits(),  # noqa: B008 (immutable)
    ) -> ProcessHandle:
        request = LaunchRequest(agent_id, argv, working_directory, dict(os.environ), resources)
        handle = await self.runtime.launch(request)
        self.agents.add(agent_id)
        self._pids.append(handle.pid)
        return handle

    def log(self, agent_id: str) -> str:
        """The texts of the live log's lines (as the agent wrote them, without time and stream)."""
        path = self.log_dir / f"{agent_id}.log"
        if not path.exists():
            return ""
        return "".join(parse_entry(raw).text + "\n" for raw in path.read_bytes().splitlines())

    async def close(self) -> None:
        for agent_id in self.agents:
            await self.runtime.terminate(agent_id, 0)
        await self.runtime.aclose()


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """PIDs (all process-group leaders) started by a test: their groups are killed afterwards."""
    started: list[int] = []
    yield started
    for pid in started:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)


@pytest.fixture
async def harness(tmp_path: Path, pids: list[int]) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "logs", pids)
    yield h
    await h.close()


def gone(pid: int) -> bool:
    """No such process, or only a zombie (orphans are reparented to PID 1, which reaps them)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually(check: Callable[[], object]) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- launch and exit -------------------------------------------------------------------------


async def test_exit_code_is_reported_once(harness: Harness) -> None:
    handle = await harness.launch("a", PY, "-c", "import sys; sys.exit(3)")
    info = await harness.exits.wait("a")
    assert (info.exit_code, info.signal) == (3, None)
    assert harness.exits.reports[0][1] == handle
    assert abs(handle.start_time - psutil.boot_time()) > 0  # a real epoch time
    await asyncio.sleep(0.05)
    assert harness.exits.count("a") == 1
    assert harness.runtime.usage("a") is None
    assert gone(handle.pid)


async def test_kill_is_noticed_at_once(harness: Harness) -> None:
    handle = await harness.launch("a", "sleep", "30")
    killed_at = time.monotonic()
    os.kill(handle.pid, signal.SIGKILL)
    info = await harness.exits.wait("a")
    assert time.monotonic() - killed_at < 0.5
    assert (info.exit_code, info.signal) == (None, signal.SIGKILL)
    assert info.reason == "killed by SIGKILL"


async def test_launch_failures_name_the_culprit(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="no-such-program"):
        await harness.launch("a", "/nonexistent/no-such-program")
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\n")
    with pytest.raises(LaunchError, match=r"script\.sh.*not executable"):
        await harness.launch("a", str(not_executable))
    with pytest.raises(LaunchError, match="missing-dir"):
        await harness.launch("a", "sleep", "1", working_directory=str(tmp_path / "missing-dir"))
    await eventually(lambda: "failed to start" in harness.log("a"))  # the log relay writes it
    assert harness.exits.reports == []


async def test_a_limit_without_a_cgroup_to_enforce_it_is_never_run_unlimited(harness: Harness) -> None:
    """Without agent cgroups, a spec stored with a memory limit (registered on a host where it
    could be enforced) does not start without it: the launch fails naming the field."""
    assert harness.runtime.refusals(ResourceLimits(open_files_max=64)) == []
    with pytest.raises(
        LaunchError, match=r"resources\.memory_max_bytes: the process runtime cannot enforce it"
    ):
        await harness.launch("capped", "sleep", "30", resources=ResourceLimits(memory_max_bytes=64 << 20))
    assert harness.exits.reports == []


async def test_second_launch_of_a_running_agent_is_refused(harness: Harness) -> None:
    await harness.launch("a", "sleep", "30")
    with pytest.raises(LaunchError, match="already has a process"):
        await harness.launch("a", "sleep", "30")


async def test_leftovers_in_the_group_die_with_the_leader(harness: Harness) -> None:
    spawn_grandchild = "import subprocess; print(subprocess.Popen(['sleep', '60']).pid)"
    handle = await harness.launch("a", PY, "-c", spawn_grandchild)
    await harness.exits.wait("a")
    await eventually(lambda: len(harness.log("a").splitlines()) > 1)  # the log relay writes it
    grandchild = int(harness.log("a").splitlines()[1])
    await eventually(lambda: gone(grandchild))
    assert gone(handle.pid)


async def test_open_files_limit_is_applied(harness: Harness) -> None:
    handle = await harness.launch("a", "sleep", "30", resources=ResourceLimits(open_files_max=64))
    assert psutil.Process(handle.pid).rlimit(psutil.RLIMIT_NOFILE) == (64, 64)


async def test_usage_covers_the_process_tree(harness: Harness) -> None:
    await harness.launch("a", PY, "-c", "import subprocess; subprocess.run(['sleep', '30'])")
    await eventually(lambda: (u := harness.runtime.usage("a")) is not None and u.num_threads >= 2)
    usage = harness.runtime.usage("a")
    assert usage is not None
    assert usage.rss_bytes > 1_000_000 and usage.open_fds >= 2 and usage.cpu_percent >= 0.0
    await harness.runtime.terminate("a", 2)
    assert harness.runtime.usage("a") is None
    assert harness.runtime.usage("unknown") is None


# --- terminate -------------------------------------------------------------------------------


async def test_terminate_well_behaved_child(harness: Harness) -> None:
    handle = await harness.launch("a", "sleep", "30")
    started = time.monotonic()
    await harness.runtime.terminate("a", 5)
    assert time.monotonic() - started < 1.0
    assert harness.exits.count("a") == 1
    assert harness.exits.reports[0][2].signal == signal.SIGTERM
    assert gone(handle.pid)
    await harness.runtime.terminate("a", 5)  # no process: a no-op
    assert harness.exits.count("a") == 1


@pytest.mark.parametrize(
    ("leader", "grandchild_session"),
    [("ignore", "group"), ("ignore", "setsid"), ("term", "group"), ("term", "setsid")],
)
async def test_terminate_kills_the_whole_family(
    harness: Harness, tmp_path: Path, pids: list[int], leader: str, grandchild_session: str
) -> None:
    script = tmp_path / "family.py"
    script.write_text(FAMILY_SCRIPT)
    handle = await harness.launch("a", PY, str(script), leader, grandchild_session)
    await eventually(lambda: "grandchild" in harness.log("a"))
    grandchild = int(harness.log("a").split("grandchild ")[1].split()[0])
    pids.append(grandchild)
    # Wait until the grandchild's `trap '' TERM` took effect (it exec'd sleep).
    await eventually(lambda: psutil.Process(grandchild).name() == "sleep")

    timeout = 0.5
    started = time.monotonic()
    await harness.runtime.terminate("a", timeout)
    elapsed = time.monotonic() - started

    info = harness.exits.reports[-1][2]
    if leader == "ignore":
        assert timeout <= elapsed < timeout + 1.0
        assert info.signal == signal.SIGKILL
    else:
        assert elapsed < timeout
        assert info.signal == signal.SIGTERM
    assert gone(handle.pid)
    assert gone(grandchild)
    assert harness.exits.count("a") == 1


async def test_concurrent_terminates_both_return(harness: Harness, tmp_path: Path) -> None:
    script = tmp_path / "family.py"
    script.write_text(FAMILY_SCRIPT)
    handle = await harness.launch("a", PY, str(script), "ignore", "group")
    await eventually(lambda: "grandchild" in harness.log("a"))
    await asyncio.wait_for(
        asyncio.gather(harness.runtime.terminate("a", 0.3), harness.runtime.terminate("a", 0.3)), 3
    )
    assert gone(handle.pid)
    assert harness.exits.count("a") == 1


# --- adopt -----------------------------------------------------------------------------------


def detached_sleep(pids: list[int]) -> tuple[subprocess.Popen[bytes], ProcessHandle]:
    """A process started as an earlier daemon would have: its own session, not the runtime's."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    pids.append(proc.pid)
    return proc, ProcessHandle(proc.pid, psutil.Process(proc.pid).create_time())


async def test_adopted_process_exit_is_reported(harness: Harness, pids: list[int]) -> None:
    proc, handle = detached_sleep(pids)
    assert harness.runtime.adopt("a", handle)
    assert harness.runtime.adopt("a", handle)  # already watched: still true, watched once
    assert harness.runtime.usage("a") is not None
    os.kill(proc.pid, signal.SIGKILL)
    info = await harness.exits.wait("a")
    assert (info.exit_code, info.signal) == (None, None)
    assert harness.exits.count("a") == 1
    proc.wait()


async def test_adopted_process_can_be_terminated(harness: Harness, pids: list[int]) -> None:
    proc, handle = detached_sleep(pids)
    assert harness.runtime.adopt("a", handle)
    await asyncio.wait_for(harness.runtime.terminate("a", 2), 3)
    assert harness.exits.count("a") == 1
    assert proc.wait(timeout=1) == -signal.SIGTERM


async def test_adopt_refuses_a_reused_or_free_pid(harness: Harness, pids: list[int]) -> None:
    proc, handle = detached_sleep(pids)
    assert not harness.runtime.adopt("a", ProcessHandle(handle.pid, handle.start_time - 5))
    assert harness.runtime.usage("a") is None
    proc.kill()
    proc.wait()
    assert not harness.runtime.adopt("a", handle)
    assert harness.exits.reports == []


DAEMON_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from pathlib import Path
    from opmasd.runtime.base import LaunchRequest
    from opmasd.runtime.process import ProcessRuntime

    async def main():
        runtime = ProcessRuntime(Path(sys.argv[1]))
        runtime.set_exit_handler(lambda *args: None)
        handle = await runtime.launch(
            LaunchRequest("agent", (sys.executable, "-c", sys.argv[2]), "", dict(os.environ))
        )
        print("HANDLE", json.dumps([handle.pid, handle.start_time]), flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def start_daemon(log_dir: Path) -> subprocess.Popen[bytes]:
    """A daemon of its own (a second Python process) that launches a ticking agent."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([PY, "-c", DAEMON_SCRIPT, str(log_dir), TICKER], stdout=subprocess.PIPE, env=env)


async def test_agent_and_its_output_survive_the_daemon(harness: Harness, pids: list[int]) -> None:
    daemon = start_daemon(harness.log_dir)
    try:
        assert daemon.stdout is not None
        line = b""
        while not line.startswith(b"HANDLE "):  # structlog writes to stdout too
            line = await asyncio.wait_for(asyncio.to_thread(daemon.stdout.readline), 10)
            assert line, "the daemon ended without launching"
        pid, start_time = json.loads(line.removeprefix(b"HANDLE "))
        pids.append(pid)
    finally:
        daemon.kill()  # the daemon dies; the agent must not
        daemon.wait()
        assert daemon.stdout is not None
        daemon.stdout.close()
    # Written by the log relay, which outlives the daemon: still writing, no pipe broke.
    await eventually(lambda: "tick 10" in harness.log("agent"))

    assert harness.runtime.adopt("agent", ProcessHandle(pid, start_time))
    harness.agents.add("agent")
    await harness.runtime.terminate("agent", 2)
    assert harness.exits.count("agent") == 1
    assert gone(pid)
    text = "\n".join(entry.text for entry in await harness.runtime.tail_logs("agent", 1000))
    assert f"--- opmasd: started pid {pid} at " in text
    assert "tick 10" in text
    last = text.splitlines()[-1]  # the exit note, after the agent's last line
    assert last.startswith(f"--- opmasd: pid {pid} ") and "adopted" in last


# --- logs ------------------------------------------------------------------------------------


async def test_tail_logs_returns_the_last_lines(harness: Harness) -> None:
    handle = await harness.launch("a", PY, "-c", "for i in range(50): print('line', i)")
    await harness.exits.wait("a")
    # Right after the exit: tail waits for the relay to store what the agent wrote.
    tail = await harness.runtime.tail_logs("a", 6)
    assert [e.text for e in tail[:5]] == [f"line {i}" for i in range(45, 50)]
    assert {e.stream for e in tail[:5]} == {LogStream.STDOUT}
    assert tail[5].text.startswith(f"--- opmasd: pid {handle.pid} ") and "exited with code 0" in tail[5].text
    assert tail[5].stream is LogStream.OPMASD and tail[5].time is not None
    head = await harness.runtime.tail_logs("a", 100)
    assert head[0].text.startswith(f"--- opmasd: started pid {handle.pid} ") and len(head) == 52
    assert await harness.runtime.tail_logs("unknown", 5) == []


async def test_the_relay_caps_the_log_of_a_running_agent(tmp_path: Path, pids: list[int]) -> None:
    harness = Harness(tmp_path / "logs", pids, log_max_bytes=2000, log_backups=2)
    try:
        chatty = "import time\nwhile True: print('x' * 99, flush=True); time.sleep(0.002)"
        await harness.launch("a", PY, "-c", chatty)
        log_file = harness.log_dir / "a.log"
        await eventually(lambda: (harness.log_dir / "a.log.2").exists())
        for _ in range(50):  # rotated when written: never over the cap, no rotate_logs needed
            assert log_file.stat().st_size <= 2000
            await asyncio.sleep(0.005)
        assert sorted(p.name for p in harness.log_dir.iterdir() if not p.name.startswith(".")) == [
            "a.log",
            "a.log.1",
            "a.log.2",
        ]
        tail = await harness.runtime.tail_logs("a", 1000)
        assert len(tail) > len(harness.log("a").splitlines())  # continued into the backups
        assert all(e.text == "x" * 99 for e in tail[1:] if e.stream is LogStream.STDOUT)
    finally:
        await harness.close()


async def test_follow_logs_yields_new_lines_and_stops(harness: Harness) -> None:
    await harness.launch("a", PY, "-c", TICKER)
    await eventually(lambda: "tick 3" in harness.log("a"))
    follower = harness.runtime.follow_logs("a")
    lines = [await asyncio.wait_for(anext(follower), 3) for _ in range(5)]
    numbers = [int(line.text.split()[1]) for line in lines]
    assert numbers[0] >= 3 and numbers == list(range(numbers[0], numbers[0] + 5))
    await follower.aclose()  # type: ignore[attr-defined]

    async def consume() -> None:
        async for _ in harness.runtime.follow_logs("a"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert asyncio.all_tasks() == {asyncio.current_task()}
