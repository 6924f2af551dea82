"""The log relay with real processes: no line lost at the cap, streams told apart, a relay killed
or left by its daemon taken over, and the relay gone once nothing is left.

`python tests/integration/test_log_relay.py RATE SECONDS [MAX_BYTES BACKUPS]` measures one run
at RATE bytes/s of agent output (lines written vs kept, the largest file, relay CPU and memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from opmasd.core.logs import LogStream
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.logfiles import parse_entry
from opmasd.runtime.logrelay_link import RelayLink
from opmasd.runtime.process import ProcessRuntime

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
MiB = 1024 * 1024

# Numbered lines on stdout (and one in five as many on stderr) at a given rate for a given time,
# as fast as it can when the rate is 0; then "done <stdout count> <stderr count>".
WRITER = textwrap.dedent(
    """
    import sys, time
    rate, seconds = float(sys.argv[1]), float(sys.argv[2])
    out, err = sys.stdout.buffer, sys.stderr.buffer
    pad = b"x" * 80
    n_out = n_err = written = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        chunk = b"".join(b"o %09d %s\\n" % (i, pad) for i in range(n_out, n_out + 400))
        out.write(chunk)
        out.flush()
        n_out += 400
        echunk = b"".join(b"e %09d %s\\n" % (i, pad) for i in range(n_err, n_err + 80))
        err.write(echunk)
        err.flush()
        n_err += 80
        written += len(chunk) + len(echunk)
        ahead = written / rate - (time.monotonic() - start) if rate else 0
        if ahead > 0:
            time.sleep(ahead)
    out.write(b"done %d %d\\n" % (n_out, n_err))
    out.flush()
    """
)

# Each line in one write: with PYTHONUNBUFFERED (set here, and in CI) print() writes "tick", " ",
# "22" and "\n" apart, and a relay killed holding "tick 22" without its newline loses it (its
# documented limit: the unterminated rest of a read is in its memory).
TICKER = textwrap.dedent(
    """
    import itertools, os, time
    for i in itertools.count():
        os.write(1, b"tick %d\\n" % i)
        time.sleep(0.005)
    """
)


def relay_pids(log_dir: Path) -> list[int]:
    """The relays serving this directory (found by name and arguments, whoever started them)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "opmasd.runtime.logrelay" not in cmdline:
            continue
        if str(log_dir) in cmdline:
            found.append(proc.pid)
    return found


async def eventually(check: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def text(path: Path) -> str:
    """A log file's raw text; "" before the relay created it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def read_all(log_dir: Path, agent_id: str, backups: int) -> list[bytes]:
    """Every stored line kept for the agent, oldest first (backups, then the live file)."""
    names = [f"{agent_id}.log.{n}" for n in range(backups, 0, -1)] + [f"{agent_id}.log"]
    return [
        line
        for name in names
        if (log_dir / name).exists()
        for line in (log_dir / name).read_bytes().splitlines()
    ]


class Runtime:
    """A ProcessRuntime on a log directory, and the agents started on it (stopped at the end)."""

    def __init__(self, log_dir: Path, **kwargs: int) -> None:
        self.log_dir = log_dir
        self.runtime = ProcessRuntime(log_dir, **kwargs)
        self.exits: dict[str, asyncio.Event] = {}
        self.runtime.set_exit_handler(lambda agent_id, handle, info: self._exited(agent_id))
        self.agents: list[str] = []

    def _exited(self, agent_id: str) -> None:
        self.exits.setdefault(agent_id, asyncio.Event()).set()

    async def launch(self, agent_id: str, *argv: str) -> int:
        handle = await self.runtime.launch(LaunchRequest(agent_id, argv, "", dict(os.environ)))
        self.agents.append(agent_id)
        return handle.pid

    async def wait_exit(self, agent_id: str, timeout: float = 10) -> None:
        await asyncio.wait_for(self.exits.setdefault(agent_id, asyncio.Event()).wait(), timeout)

    async def close(self) -> None:
        for agent_id in self.agents:
            await self.runtime.terminate(agent_id, 1)
        await self.runtime.aclose()


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    rt = Runtime(tmp_path / "logs", log_max_bytes=MiB, log_backups=3)
    yield rt
    await rt.close()
    await eventually(lambda: not relay_pids(rt.log_dir))  # (5) the relay exits by itself


# --- (1) no loss at the cap ------------------------------------------------------------------


@dataclass
class Measurement:
    rate: float
    written: dict[str, int]  # lines per stream
    kept: dict[str, int]
    gaps: dict[str, int]  # numbers missing inside the kept span
    max_file: int  # the largest any file was seen
    max_total: int
    relay_cpu: float  # percent of one CPU, over the run
    relay_rss: int


async def measure(rt: Runtime, rate: float, seconds: float, max_bytes: int, backups: int) -> Measurement:
    await rt.launch("w", PY, "-c", WRITER, str(rate), str(seconds))
    relay = psutil.Process(relay_pids(rt.log_dir)[0])
    cpu_before, started = sum(relay.cpu_times()[:2]), time.monotonic()
    names = [f"w.log.{n}" for n in range(backups + 1, 0, -1)] + ["w.log"]
    max_file = max_total = 0
    done = asyncio.ensure_future(rt.wait_exit("w", seconds + 10))
    while not done.done():
        sizes = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(rt.log_dir / name)
                sizes[st.st_ino] = st.st_size
        assert not (rt.log_dir / f"w.log.{backups + 1}").exists(), "more backups than configured"
        max_file = max(max_file, *sizes.values(), 0)
        max_total = max(max_total, sum(sizes.values()))
        await asyncio.sleep(0.001)
    await done
    await rt.runtime.tail_logs("w", 1)  # the relay has stored everything the agent wrote
    cpu = (sum(relay.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started) * 100
    rss = relay.memory_info().rss
    entries = [parse_entry(raw) for raw in read_all(rt.log_dir, "w", backups)]
    done_line = [e.text for e in entries if e.text.startswith("done ")]
    assert done_line, "the writer's last line is missing"
    n_out, n_err = map(int, done_line[0].split()[1:])
    kept: dict[str, int] = {}
    gaps: dict[str, int] = {}
    for tag, stream, total in (("o", LogStream.STDOUT, n_out), ("e", LogStream.STDERR, n_err)):
        numbers = [int(e.text.split()[1]) for e in entries if e.stream is stream and e.text[:2] == f"{tag} "]
        assert numbers == sorted(set(numbers)), f"{tag}: lines out of order or twice"
        assert numbers and numbers[-1] == total - 1, f"{tag}: the last lines written are missing"
        kept[tag] = len(numbers)
        gaps[tag] = numbers[-1] - numbers[0] + 1 - len(numbers)
    return Measurement(rate, {"o": n_out, "e": n_err}, kept, gaps, max_file, max_total, cpu, rss)


async def test_no_line_is_lost_at_the_cap_at_10_mb_per_second(runtime: Runtime) -> None:
    m = await measure(runtime, 10e6, 3.0, MiB, 3)
    print(f"\n{m}")
    assert m.gaps == {"o": 0, "e": 0}, "lines lost inside the span kept"
    assert m.max_file <= MiB, "a file went over the cap"
    assert m.max_total <= 4 * MiB
    # The budget is used: what is kept is the newest 3-4 MiB, not a fraction of it.
    kept_bytes = sum((runtime.log_dir / n).stat().st_size for n in ("w.log.3", "w.log.2", "w.log.1"))
    assert kept_bytes > 3 * (MiB - 200)
    assert m.written["o"] > 150_000, "the writer did not reach its rate"  # ~10 MB/s for 3 s


# --- (2) streams -----------------------------------------------------------------------------


async def test_stdout_stderr_and_notes_are_told_apart(runtime: Runtime) -> None:
    # Pauses between the streams: across two pipes, the order is the order the relay reads them.
    script = (
        "import sys, time\nprint('to out', flush=True)\ntime.sleep(0.2)\n"
        "print('to err', file=sys.stderr, flush=True)\ntime.sleep(0.2)\n"
        "sys.stdout.write('x' * 70000 + '\\nunterminated')"
    )
    pid = await runtime.launch("s", PY, "-c", script)
    await runtime.wait_exit("s")
    tail = await runtime.runtime.tail_logs("s", 10)
    expected = [
        (LogStream.OPMASD, f"--- opmasd: started pid {pid} "),
        (LogStream.STDOUT, "to out"),
        (LogStream.STDERR, "to err"),
        (LogStream.STDOUT, "x" * 20),  # a 70000-byte line: in pieces of 64 KiB
        (LogStream.STDOUT, "x" * 20),
        (LogStream.STDOUT, "unterminated"),  # flushed at end of file
        (LogStream.OPMASD, f"--- opmasd: pid {pid} exited with code 0"),
    ]
    assert [
        (e.stream, e.text[: len(start)]) for e, (_, start) in zip(tail, expected, strict=True)
    ] == expected
    assert [len(e.text) for e in tail[3:5]] == [65536, 70000 - 65536]
    raw = (runtime.log_dir / "s.log").read_text().splitlines()
    assert raw[1].endswith(" out to out") and raw[2].endswith(" err to err") and " opm --- " in raw[0]
    assert oct((runtime.log_dir / "s.log").stat().st_mode & 0o777) == "0o640"
    assert oct((runtime.log_dir / ".logrelay.sock").stat().st_mode & 0o777) == "0o600"


# --- (3) the relay killed --------------------------------------------------------------------

# x86_64 numbers of the calls a relay waits in between reads (the selector is epoll).
_WAITING_SYSCALLS = {"232", "281"}  # epoll_wait, epoll_pwait


def _current_syscall(pid: int) -> str:
    return Path(f"/proc/{pid}/syscall").read_text().split()[0]


async def kill_while_waiting(pid: int) -> None:
    """SIGKILL the relay while it waits in its selector, i.e. with nothing read and unwritten.

    Killed at a random moment it may lose the one read it holds (its documented limit); this
    test is about what happens to everything else, so it stops the relay, looks at the system
    call it stopped in, and kills it only in the wait — otherwise lets it go on and tries again.
    """
    for _ in range(500):
        os.kill(pid, signal.SIGSTOP)
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            await asyncio.sleep(0.001)
        if _current_syscall(pid) in _WAITING_SYSCALLS:
            os.kill(pid, signal.SIGKILL)
            return
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.002)
    raise AssertionError(f"relay {pid} never stopped in its wait")


async def test_a_killed_relay_is_replaced_and_the_agent_never_notices(runtime: Runtime) -> None:
    agent = await runtime.launch("t", PY, "-c", TICKER)
    await eventually(lambda: "tick 20" in text(runtime.log_dir / "t.log"))
    (first,) = relay_pids(runtime.log_dir)
    await kill_while_waiting(first)
    await eventually(lambda: relay_pids(runtime.log_dir) not in ([], [first]))
    (second,) = relay_pids(runtime.log_dir)
    # The agent kept writing into its pipe meanwhile (no EPIPE: opmasd held a read end) and the
    # new relay carries on from there.
    before = len(text(runtime.log_dir / "t.log").splitlines())
    await eventually(lambda: len(text(runtime.log_dir / "t.log").splitlines()) > before + 20)
    assert psutil.Process(agent).status() != psutil.STATUS_ZOMBIE
    numbers = [
        int(e.text.split()[1]) for e in await runtime.runtime.tail_logs("t", 100_000) if e.text[:5] == "tick "
    ]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), (
        "lines lost across the relay restart"
    )
    assert second != first


# --- (4) the daemon killed -------------------------------------------------------------------

DAEMON = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from opmasd.runtime.base import LaunchRequest
    from opmasd.runtime.process import ProcessRuntime

    async def main():
        runtime = ProcessRuntime(Path(sys.argv[1]))
        runtime.set_exit_handler(lambda *args: None)
        request = LaunchRequest("t", (sys.executable, "-c", sys.argv[2]), "", dict(os.environ))
        handle = await runtime.launch(request)
        print("PID", handle.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def start_daemon(log_dir: Path) -> subprocess.Popen[bytes]:
    """A daemon of its own (a second Python process) that launches a ticking agent."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([PY, "-c", DAEMON, str(log_dir), TICKER], stdout=subprocess.PIPE, env=env)


async def test_the_relay_outlives_its_daemon_and_serves_the_next(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    daemon = start_daemon(log_dir)
    agent = 0
    try:
        assert daemon.stdout is not None
        line = b""
        while not line.startswith(b"PID "):
            line = await asyncio.wait_for(asyncio.to_thread(daemon.stdout.readline), 10)
            assert line, "the daemon ended without launching"
        agent = int(line.split()[1])
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()
        await eventually(lambda: "tick 20" in text(log_dir / "t.log"))
        (first,) = relay_pids(log_dir)
        # A new daemon connects and is handed spare read ends of the agent's pipes...
        link = RelayLink(log_dir, max_bytes=10 * MiB, backups=3)
        link.check()
        await eventually(lambda: sum(len(h.fds) for h in link._held.values()) == 2)
        # ...so that the relay can die without the agent noticing: the new daemon restarts it.
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: relay_pids(log_dir) not in ([], [first]))
        before = text(log_dir / "t.log").count("\n")
        await eventually(lambda: text(log_dir / "t.log").count("\n") > before + 20)
        assert psutil.Process(agent).status() != psutil.STATUS_ZOMBIE
        os.kill(agent, signal.SIGKILL)
        await eventually(lambda: not link._held)  # end of file seen: the spare ends are let go
        link.close()
        await eventually(lambda: not relay_pids(log_dir))
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if agent:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent, signal.SIGKILL)
        for pid in relay_pids(log_dir):
            os.kill(pid, signal.SIGKILL)


async def test_the_relay_exits_when_nothing_is_left(runtime: Runtime) -> None:
    await runtime.launch("q", PY, "-c", "print('bye')")
    await runtime.wait_exit("q")
    (relay,) = relay_pids(runtime.log_dir)
    await asyncio.sleep(0.3)
    assert psutil.pid_exists(relay), "the relay left while opmasd was still connected"
    await runtime.runtime.aclose()  # the fixture checks that it is gone soon after


if __name__ == "__main__":

    async def _main(rate: float, seconds: float, max_bytes: int, backups: int) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            rt = Runtime(Path(directory) / "logs", log_max_bytes=max_bytes, log_backups=backups)
            try:
                print(await measure(rt, rate, seconds, max_bytes, backups))
            finally:
                await rt.close()

    # RATE SECONDS [MAX_BYTES BACKUPS]: a budget larger than the run keeps every line, so
    # kept == written proves that no rotation lost any.
    extra = [int(float(a)) for a in sys.argv[3:5]] or [MiB, 3]
    asyncio.run(_main(float(sys.argv[1]), float(sys.argv[2]), *extra))
