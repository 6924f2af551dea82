"""SystemdRuntime against a real systemd 252, booted in namespaces (tests/systemd_sandbox.py).

Agents are small Python programs under /var/tmp (the sandbox's /tmp and /run are its own). They
write what they see into files there, which the tests read; exits arrive through the runtime's
exit handler, which the runtime drives from systemd's signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from systemd_sandbox import SANDBOX_PYTHON, SystemdSandbox

from opmasd.core.errors import BackendError, LaunchError
from opmasd.core.logs import LogEntry, LogStream
from opmasd.core.model import ExitInfo, ProcessHandle, ResourceLimits
from opmasd.core.privileges import Sandbox
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.systemd import JournalSource, SystemdRuntime
from opmasd.runtime.systemd_units import escape_unit_name

WAIT = 15.0  # seconds for anything awaited; none should take more than a fraction of one
PY = SANDBOX_PYTHON  # not sys.executable: a clean clone's venv is under the host's /tmp
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# The agents' scripts and the files they write are under /var/tmp, which the default
# PrivateTmp=yes would hide from them (tests/integration/test_systemd_sandboxing.py checks it).
SHARED_TMP = Sandbox(private_tmp=False)


class Exits:
    """The exit handler of the tests: every report, and an event per agent."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, ProcessHandle, ExitInfo]] = []
        self._events: dict[str, asyncio.Event] = {}

    def __call__(self, agent_id: str, handle: ProcessHandle, info: ExitInfo) -> None:
        self.reports.append((agent_id, handle, info))
        self._events.setdefault(agent_id, asyncio.Event()).set()

    async def wait(self, agent_id: str, timeout: float = WAIT) -> ExitInfo:
        await asyncio.wait_for(self._events.setdefault(agent_id, asyncio.Event()).wait(), timeout)
        return self.of(agent_id)[-1]

    def of(self, agent_id: str) -> list[ExitInfo]:
        return [info for aid, _, info in self.reports if aid == agent_id]


class Harness:
    """One runtime connected to the sandbox, with helpers to write and launch agents."""

    def __init__(self, sd: SystemdSandbox, work: Path, instance: str = "") -> None:
        self.sd = sd
        self.work = work
        self.exits = Exits()
        # An opmasd of its own: its instance id and its runtime directory (in the sandbox's /run).
        self.instance = instance or uuid.uuid4().hex
        self.env_dir = Path(f"/run/opmas-test-{uuid.uuid4().hex[:8]}/systemd-env")
        self.runtime = self.new_runtime()
        self.runtime.set_exit_handler(self.exits)

    def new_runtime(self, instance: str | None = None) -> SystemdRuntime:
        journal = JournalSource(directory=self.sd.host_path("/run/log/journal"))
        return SystemdRuntime(self.sd.bus_address, journal, root=self.sd.host_path("/"),
                              instance=self.instance if instance is None else instance,
                              env_dir=self.env_dir)  # fmt: skip

    def script(self, name: str, body: str) -> Path:
        path = self.work / f"{name}.py"
        path.write_text(textwrap.dedent(body))
        return path

    def request(
        self,
        agent_id: str,
        body: str,
        *args: str,
        resources: ResourceLimits = ResourceLimits(),  # noqa: B008 (immutable)
        environment: dict[str, str] | None = None,
        working_directory: str = "",
    ) -> LaunchRequest:
        script = self.script(uuid.uuid4().hex[:8], body)
        env = {**ENV, "WORK": str(self.work), **(environment or {})}
        argv = (PY, str(script), *args)
        return LaunchRequest(agent_id, argv, working_directory, env, resources, sandbox=SHARED_TMP)

    async def launch(self, agent_id: str, body: str, *args: str, **kwargs: object) -> ProcessHandle:
        return await self.runtime.launch(self.request(agent_id, body, *args, **kwargs))  # type: ignore[arg-type]

    def show(self, unit: str, prop: str) -> str:
        return self.sd.run("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()

    async def file(self, name: str, timeout: float = WAIT) -> str:
        """A file an agent writes, once it is there and complete (agents write name.tmp, then rename)."""
        path = self.work / name
        async with asyncio.timeout(timeout):
            while not path.exists():
                await asyncio.sleep(0.02)
        return path.read_text()


def alive(sd: SystemdSandbox, pid: int) -> bool:
    """Whether the sandbox's process runs: gone, or a zombie its new parent (PID 1) has yet to reap."""
    try:
        state = sd.host_path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def agent(prefix: str) -> str:
    """An agent id of its own per test: the sandbox lives for the whole session."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="opmas-sdrt-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def harness(systemd_sandbox: SystemdSandbox, work: Path) -> AsyncIterator[Harness]:
    h = Harness(systemd_sandbox, work)
    await h.runtime.connect()
    try:
        yield h
    finally:
        for agent_id in list(h.runtime._watched):
            with contextlib.suppress(Exception):
                await h.runtime.terminate(agent_id, 0.5)
        await h.runtime.aclose()


# Writes a file atomically: agents report through these.
REPORT = """
import json, os, sys, time
def report(name, value):
    path = os.path.join(os.environ["WORK"], name)
    with open(path + ".tmp", "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value))
    os.rename(path + ".tmp", path)
"""
SLEEPER = (
    REPORT
    + """
report("pid", str(os.getpid()))
time.sleep(1000)
"""
)


async def test_the_agent_is_the_units_main_process_and_systemd_never_restarts_it(harness: Harness) -> None:
    agent_id = agent("main")
    unit = escape_unit_name(agent_id)
    handle = await harness.launch(agent_id, SLEEPER)
    assert handle.pid == int(await harness.file("pid"))  # systemd-cat exec'd the agent
    assert harness.show(unit, "MainPID") == str(handle.pid)
    stat = harness.sd.host_path(f"/proc/{handle.pid}/stat").read_text()
    assert handle.start_time == int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    cmdline = harness.sd.host_path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0] == PY.encode() and b"systemd-cat" not in cmdline[0]
    shown = {
        prop: harness.show(unit, prop)
        for prop in ("Description", "Restart", "KillMode", "CollectMode", "SendSIGKILL",
                     "StartLimitIntervalUSec", "MemoryAccounting", "TasksAccounting", "Type")
    }  # fmt: skip
    assert shown == {
        "Description": f"OPMAS agent {agent_id} (opmasd {harness.instance})",
        "Restart": "no",
        "KillMode": "control-group",
        "CollectMode": "inactive-or-failed",
        "SendSIGKILL": "yes",
        "StartLimitIntervalUSec": "0",
        "MemoryAccounting": "yes",
        "TasksAccounting": "yes",
        "Type": "exec",
    }
    assert harness.runtime.adopt(agent_id, None) == handle  # already watched: the same process
    await harness.runtime.terminate(agent_id, 5)
    info = harness.exits.of(agent_id)
    assert [(i.exit_code, i.signal) for i in info] == [(None, signal.SIGTERM)]
    assert harness.show(unit, "LoadState") == "not-found"  # collected: the name is free again


async def test_an_exit_code_is_reported_once(harness: Harness) -> None:
    agent_id = agent("exit3")
    handle = await harness.launch(agent_id, "import time, sys; time.sleep(0.3); sys.exit(3)")
    info = await harness.exits.wait(agent_id)
    assert (info.exit_code, info.signal, info.reason) == (3, None, "exited with code 3")
    assert harness.exits.reports[-1][1] == handle
    await asyncio.sleep(0.3)  # the unit's removal and repeated properties come after
    assert len(harness.exits.of(agent_id)) == 1
    assert harness.runtime.usage(agent_id) is None
    # The name is free: the same agent starts again at once (no start limit, no stale unit).
    await harness.launch(agent_id, "import sys; import time; time.sleep(0.2); sys.exit(4)")
    assert (await asyncio.wait_for(_nth_exit(harness, agent_id, 2), WAIT)).exit_code == 4


async def _nth_exit(harness: Harness, agent_id: str, n: int) -> ExitInfo:
    while len(harness.exits.of(agent_id)) < n:
        await asyncio.sleep(0.02)
    return harness.exits.of(agent_id)[n - 1]


async def test_sigkill_is_reported_as_signal_9(harness: Harness) -> None:
    agent_id = agent("killed")
    handle = await harness.launch(agent_id, SLEEPER)
    harness.sd.run("kill", "-KILL", str(handle.pid))
    info = await harness.exits.wait(agent_id)
    assert (info.exit_code, info.signal, info.cause) == (None, signal.SIGKILL, "")
    assert info.reason == "killed by SIGKILL"


async def test_terminate_kills_what_ignores_sigterm_after_the_timeout(harness: Harness) -> None:
    agent_id = agent("stubborn")
    body = (
        REPORT
        + """
import signal, subprocess
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 1000"])
report("ready", str(child.pid))
time.sleep(1000)
"""
    )
    handle = await harness.launch(agent_id, body)
    child = int(await harness.file("ready"))
    began = time.monotonic()
    await harness.runtime.terminate(agent_id, 0.5)
    took = time.monotonic() - began
    assert 0.5 <= took < 3.0
    info = harness.exits.of(agent_id)
    assert [(i.exit_code, i.signal) for i in info] == [(None, signal.SIGKILL)]
    for pid in (handle.pid, child):  # the whole cgroup, the child too
        assert not alive(harness.sd, pid), pid
    await harness.runtime.terminate(agent_id, 0.5)  # no unit now: a no-op


async def test_memory_max_bites_and_the_exit_says_out_of_memory(harness: Harness) -> None:
    agent_id = agent("hog")
    body = "import time; time.sleep(0.2); x = b'a' * (200 << 20); time.sleep(30)"
    await harness.launch(agent_id, body, resources=ResourceLimits(memory_max_bytes=32 << 20))
    info = await harness.exits.wait(agent_id)
    assert info.signal == signal.SIGKILL
    assert info.cause == "out of memory (MemoryMax)"
    assert info.reason == "killed by SIGKILL: out of memory (MemoryMax)"


async def test_tasks_max_bounds_a_fork_bomb(harness: Harness) -> None:
    agent_id = agent("forks")
    body = (
        REPORT
        + """
forked = failed = 0
for _ in range(60):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(1000)
        os._exit(0)
    forked += 1
report("forks", {"forked": forked, "failed": failed})
time.sleep(1000)
"""
    )
    await harness.launch(agent_id, body, resources=ResourceLimits(tasks_max=12))
    forks = json.loads(await harness.file("forks"))
    assert forks["forked"] < 12 and forks["failed"] > 0, forks
    usage = harness.runtime.usage(agent_id)
    assert usage is not None and usage.rss_bytes > 0
    await harness.runtime.terminate(agent_id, 2)


async def test_limits_environment_argv_and_working_directory_reach_the_agent(harness: Harness) -> None:
    agent_id = agent("sees")
    body = (
        REPORT
        + """
limits = [l for l in open("/proc/self/limits") if l.startswith("Max open files")]
report("seen", {"limits": limits[0].split()[3:5], "env": os.environ.get("OPMAS_X"),
                "cwd": os.getcwd(), "argv": sys.argv[1:]})
time.sleep(1000)
"""
    )
    resources = ResourceLimits(open_files_max=123, cpu_quota_percent=50)
    await harness.launch(
        agent_id, body, "$HOME", "${OPMAS_X}", "%n", resources=resources,
        environment={"OPMAS_X": "a $HOME b"}, working_directory=str(harness.work),
    )  # fmt: skip
    seen = json.loads(await harness.file("seen"))
    assert seen == {
        "limits": ["123", "123"],
        "env": "a $HOME b",
        "cwd": str(harness.work),
        "argv": ["$HOME", "${OPMAS_X}", "%n"],  # as given: no expansion by systemd
    }
    assert harness.show(escape_unit_name(agent_id), "CPUQuotaPerSecUSec") == "500ms"


TALKER = (
    REPORT
    + """
print("out-1", flush=True)
print("err-1", file=sys.stderr, flush=True)
sys.stdout.buffer.write(b"bytes-\\xff-1\\n"); sys.stdout.flush()
report("spoke", "1")
while not os.path.exists(os.path.join(os.environ["WORK"], "go")):
    time.sleep(0.02)
print("out-2", flush=True)
print("err-2", file=sys.stderr, flush=True)
time.sleep(1000)
"""
)


async def _tail_until(
    harness: Harness, agent_id: str, done: Callable[[list[LogEntry]], bool]
) -> list[LogEntry]:
    """The agent's tail, once journald has what the test waits for (it reads streams on its own)."""
    async with asyncio.timeout(WAIT):
        while not done(entries := await harness.runtime.tail_logs(agent_id, 50)):
            await asyncio.sleep(0.05)
    return entries


async def test_stdout_and_stderr_are_told_apart_in_tail_and_follow(harness: Harness) -> None:
    agent_id = agent("talker")
    await harness.launch(agent_id, TALKER)
    await harness.file("spoke")
    entries = await _tail_until(
        harness, agent_id, lambda es: {"out-1", "err-1", "bytes-\ufffd-1"} <= {e.text for e in es}
    )
    by_text = {e.text: e for e in entries}
    assert by_text["out-1"].stream is LogStream.STDOUT
    assert by_text["err-1"].stream is LogStream.STDERR
    assert by_text["bytes-\ufffd-1"].stream is LogStream.STDOUT  # not UTF-8: a byte array in JSON
    assert by_text["out-1"].time is not None and abs(time.time() - by_text["out-1"].time.timestamp()) < 60
    assert any(e.stream is LogStream.OPMASD and "Started" in e.text for e in entries)  # systemd's note
    assert [e.text for e in await harness.runtime.tail_logs(agent_id, 1)] == [entries[-1].text]

    follower = harness.runtime.follow_logs(agent_id)
    seen: dict[str, LogStream] = {}

    async def read() -> None:
        async for entry in follower:
            seen[entry.text] = entry.stream
            if {"out-2", "err-2"} <= seen.keys():
                return

    reading = asyncio.ensure_future(read())
    await asyncio.sleep(0.5)  # journalctl -f is reading by now
    (harness.work / "go").touch()
    await asyncio.wait_for(reading, WAIT)
    assert seen["out-2"] is LogStream.STDOUT and seen["err-2"] is LogStream.STDERR
    assert "out-1" not in seen  # follow starts at the end
    await follower.aclose()  # type: ignore[attr-defined]
    children = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "journalctl" not in children


async def test_a_restarted_daemon_adopts_the_unit_and_gets_its_exit(harness: Harness) -> None:
    agent_id = agent("adopted")
    body = (
        REPORT
        + """
report("pid", str(os.getpid()))
while not os.path.exists(os.path.join(os.environ["WORK"], "stop")):
    time.sleep(0.02)
sys.exit(7)
"""
    )
    handle = await harness.launch(agent_id, body)
    await harness.file("pid")
    await harness.runtime.aclose()  # the daemon goes; the unit stays

    second = harness.new_runtime()
    exits = Exits()
    second.set_exit_handler(exits)
    await second.connect()
    try:
        assert second.adopt(agent_id, handle) == handle
        assert second.adopt(agent("nobody"), None) is None
        usage = second.usage(agent_id)
        assert usage is not None and usage.rss_bytes > 0 and usage.num_threads >= 1 and usage.open_fds >= 3
        (harness.work / "stop").touch()
        info = await exits.wait(agent_id)
        assert (info.exit_code, info.signal) == (7, None)
        assert exits.reports[0][1] == handle
        assert harness.exits.reports == []  # the first runtime, closed, reports nothing
        reaped = await second.reap_unmanaged()
        assert not [line for line in reaped if escape_unit_name(agent_id) in line]
    finally:
        await second.aclose()


async def test_reap_unmanaged_stops_a_unit_nobody_adopted(harness: Harness) -> None:
    agent_id = agent("orphan")
    unit = escape_unit_name(agent_id)
    handle = await harness.launch(agent_id, SLEEPER)
    await harness.runtime.aclose()

    second = harness.new_runtime()
    exits = Exits()
    second.set_exit_handler(exits)
    await second.connect()
    try:
        with pytest.raises(LaunchError, match=r"already active .*adopt it or stop it first"):
            await second.launch(harness.request(agent_id, SLEEPER))
        lines = await second.reap_unmanaged()
        mine = [line for line in lines if unit in line]
        assert len(mine) == 1 and mine[0].startswith("stopped unit") and f"pid {handle.pid}" in mine[0]
        assert harness.show(unit, "LoadState") == "not-found"
        assert exits.reports == []
        assert second.adopt(agent_id, handle) is None
    finally:
        await second.aclose()


async def test_usage_shows_memory_and_cpu(harness: Harness) -> None:
    agent_id = agent("busy")
    body = (
        REPORT
        + """
x = bytearray(30 << 20)
report("ready", "1")
while True:
    pass
"""
    )
    await harness.launch(agent_id, body)
    await harness.file("ready")
    first = harness.runtime.usage(agent_id)
    await asyncio.sleep(0.5)
    second = harness.runtime.usage(agent_id)
    assert first is not None and second is not None
    assert second.rss_bytes > 30 << 20
    assert second.cpu_percent > 10, second
    assert second.num_threads >= 1 and second.open_fds >= 3


async def test_an_agent_id_that_needs_escaping_works_end_to_end(harness: Harness) -> None:
    agent_id = agent("my-agent/x y")
    unit = escape_unit_name(agent_id)
    assert "\\x2d" in unit and "\\x20" in unit
    handle = await harness.launch(agent_id, TALKER)
    assert harness.show(unit, "MainPID") == str(handle.pid)
    entries = await _tail_until(harness, agent_id, lambda es: "err-1" in {e.text for e in es})
    assert {e.text: e.stream for e in entries}["err-1"] is LogStream.STDERR
    await harness.runtime.terminate(agent_id, 2)
    assert len(harness.exits.of(agent_id)) == 1


async def test_a_program_that_cannot_run_is_a_launch_error(harness: Harness) -> None:
    missing = LaunchRequest(agent("missing"), ("/var/tmp/no/such/program",), "", ENV)
    with pytest.raises(LaunchError, match="not found"):
        await harness.runtime.launch(missing)
    not_exec = harness.work / "data.txt"
    not_exec.write_text("not a program")
    with pytest.raises(LaunchError, match="not executable"):
        await harness.runtime.launch(LaunchRequest(agent("data"), (str(not_exec),), "", ENV))
    # systemd's own refusal: the working directory does not exist (status 200/CHDIR).
    agent_id = agent("nowhere")
    request = harness.request(agent_id, SLEEPER, working_directory="/var/tmp/no/such/dir")
    with pytest.raises(LaunchError, match="200/CHDIR"):
        await harness.runtime.launch(request)
    assert harness.exits.of(agent_id) == []
    assert harness.runtime.usage(agent_id) is None


async def test_a_program_that_ends_at_once_is_a_launch_error_or_one_exit(harness: Harness) -> None:
    agent_id = agent("brief")
    try:
        handle = await harness.runtime.launch(harness.request(agent_id, "import sys; sys.exit(5)"))
    except LaunchError as exc:
        # Ended before it was seen running: systemd's status and the agent's unit named.
        assert "exited at once with code 5" in str(exc) and escape_unit_name(agent_id) in str(exc)
        assert harness.exits.of(agent_id) == []
    else:
        info = await harness.exits.wait(agent_id)  # reported after launch returned, once
        assert info.exit_code == 5 and harness.exits.reports[-1][1] == handle


async def test_an_unreachable_bus_is_a_clear_backend_error(work: Path) -> None:
    runtime = SystemdRuntime(f"unix:path={work}/no-bus")
    with pytest.raises(BackendError, match="cannot reach systemd"):
        await runtime.connect()
    with pytest.raises(LaunchError, match="not connected"):
        await runtime.launch(LaunchRequest("a", ("/bin/true",), ""))


def test_the_sandbox_enforces_every_limit(harness: Harness) -> None:
    limits = ResourceLimits(memory_max_bytes=1 << 30, cpu_quota_percent=50, tasks_max=10, open_files_max=10)
    assert harness.runtime.refusals(limits) == []


async def test_a_failed_unit_left_loaded_is_reset_and_its_name_reused(harness: Harness) -> None:
    agent_id = agent("stale")
    unit = escape_unit_name(agent_id)
    # Not one of ours: CollectMode=inactive keeps it loaded once it failed.
    harness.sd.run("systemd-run", f"--unit={unit}", "-p", "CollectMode=inactive", "--wait", "/bin/false",
                   check=False)  # fmt: skip
    assert harness.show(unit, "ActiveState") == "failed"
    handle = await harness.launch(agent_id, SLEEPER)
    assert harness.show(unit, "MainPID") == str(handle.pid)
    assert harness.exits.of(agent_id) == []  # the old unit's end is not this process's
    await harness.runtime.terminate(agent_id, 2)
    assert len(harness.exits.of(agent_id)) == 1


async def test_what_a_short_lived_agent_wrote_is_in_its_log(harness: Harness) -> None:
    # journald may store such lines without _SYSTEMD_UNIT (the writer's cgroup was gone when it
    # looked): found by their identifier all the same.
    ids = [agent("brief") for _ in range(8)]
    for n, agent_id in enumerate(ids):
        request = LaunchRequest(agent_id, ("/bin/sh", "-c", f"echo why-{n} >&2; exit 2"), "", ENV)
        with contextlib.suppress(LaunchError):  # ended before it was seen running
            await harness.runtime.launch(request)
    for n, agent_id in enumerate(ids):
        entries = await _tail_until(harness, agent_id, says(f"why-{n}"))
        assert {e.text: e.stream for e in entries}[f"why-{n}"] is LogStream.STDERR


def says(text: str) -> Callable[[list[LogEntry]], bool]:
    return lambda entries: text in {e.text for e in entries}


async def test_a_daemon_reload_is_not_an_exit(harness: Harness) -> None:
    """`systemctl daemon-reload` (every package install runs one) unloads and loads every unit
    again: the agent's unit is removed and back at once, its process never ended."""
    agent_id = agent("reload")
    handle = await harness.launch(agent_id, "import time; time.sleep(1000)")
    harness.sd.run("systemctl", "daemon-reload")
    await asyncio.sleep(1.0)
    assert harness.exits.of(agent_id) == [], "a reload was taken for the agent's end"
    assert alive(harness.sd, handle.pid)
    await harness.runtime.terminate(agent_id, 5)  # still watched: the stop ends it
    info = await harness.exits.wait(agent_id)
    assert info.signal == signal.SIGTERM and not alive(harness.sd, handle.pid)
