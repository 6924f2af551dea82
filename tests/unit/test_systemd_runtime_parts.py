"""The parts of the systemd runtime that need no systemd: exits from unit properties, the merge
and dedupe of signals, journal lines, the agent's unit, cgroup files and the v1 OOM verdict.

The signal sequences below are the ones a real systemd 252 sent (tests/integration/
test_systemd_runtime.py runs the same paths against it).
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opmasd.core.logs import LogStream
from opmasd.core.model import ExitInfo, ProcessHandle, ResourceLimits
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.systemd import SystemdRuntime
from opmasd.runtime.systemd_cgroup import CgroupLayout, OomWatch, UnitUsage
from opmasd.runtime.systemd_journal import EntryParser, JournalSource, parse_entry
from opmasd.runtime.systemd_launch import agent_unit, check_program
from opmasd.runtime.systemd_units import ChangeKind, TransientUnit, UnitChange, transient_properties
from opmasd.runtime.systemd_watch import (
    CLD_DUMPED,
    CLD_EXITED,
    CLD_KILLED,
    OOM_CAUSE,
    Outcome,
    UnitWatch,
    exit_info,
    start_failure,
)

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
UNIT = "opmas-agent-x.service"


# -- exits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "result", "oom", "expected"),
    [
        (CLD_EXITED, 0, "success", False, (0, None, "exited with code 0")),
        (CLD_EXITED, 3, "exit-code", False, (3, None, "exited with code 3")),
        (CLD_KILLED, 15, "success", False, (None, 15, "killed by SIGTERM")),
        (CLD_DUMPED, 11, "core-dump", False, (None, 11, "killed by SIGSEGV")),
        (CLD_KILLED, 9, "signal", True, (None, 9, f"killed by SIGKILL: {OOM_CAUSE}")),  # cgroup v1
        (CLD_KILLED, 9, "oom-kill", False, (None, 9, f"killed by SIGKILL: {OOM_CAUSE}")),  # cgroup v2
    ],
)
def test_exit_info_from_exec_main_code_and_status(
    code: int, status: int, result: str, oom: bool, expected: tuple[int | None, int | None, str]
) -> None:
    info = exit_info(code, status, result, oom, WHEN)
    assert (info.exit_code, info.signal, info.reason) == expected
    assert info.time == WHEN


def test_an_exit_without_a_status_says_what_systemd_said() -> None:
    info = exit_info(0, 0, "resources", False, WHEN)
    assert (info.exit_code, info.signal) == (None, None)
    assert info.cause == "systemd gave no status (resources)"


def test_exit_reasons_without_a_cause_are_unchanged() -> None:
    assert ExitInfo(1, None).reason == "exited with code 1"
    assert ExitInfo(None, 9, leftovers=("12 sleep",)).reason == (
        "killed by SIGKILL; killed 1 leftover process(es): 12 sleep"
    )
    with_both = ExitInfo(None, 9, leftovers=("12 sleep",), cause="out of memory (MemoryMax)")
    assert (
        with_both.reason
        == "killed by SIGKILL: out of memory (MemoryMax); killed 1 leftover process(es): 12 sleep"
    )


def test_start_failures_name_systemds_reason() -> None:
    assert start_failure(CLD_EXITED, 203, "exit-code", "failed") == (
        "systemd could not start it: status 203/EXEC: the program could not be executed"
    )
    assert "200/CHDIR" in start_failure(CLD_EXITED, 200, "exit-code", "failed")
    assert start_failure(CLD_EXITED, 1, "exit-code", "done") == "it exited at once with code 1"
    assert start_failure(0, 0, "resources", "failed") == (
        "systemd could not start it (result resources, start job failed)"
    )


# -- signals ----------------------------------------------------------------------------------


def service(main_pid: int, code: int = 0, status: int = 0, result: str = "success") -> UnitChange:
    return UnitChange(UNIT, ChangeKind.PROPERTIES, main_pid=main_pid, exec_main_code=code,
                      exec_main_status=status, result=result)  # fmt: skip


def unit(active: str, sub: str) -> UnitChange:
    return UnitChange(UNIT, ChangeKind.PROPERTIES, active_state=active, sub_state=sub)


JOB_DONE = UnitChange(UNIT, ChangeKind.JOB_REMOVED, job_id=25, job_result="done")
REMOVED = UnitChange(UNIT, ChangeKind.UNIT_REMOVED)
# A launch as systemd 252 signals it: the new unit is "inactive" first, then starts.
STARTING = [
    *(service(84), unit("inactive", "dead")),
    *(service(84), unit("activating", "start")),
    *(service(84), unit("active", "running"), JOB_DONE),
    *(service(84), unit("active", "running")),
]
EXIT_3 = [service(0, CLD_EXITED, 3, "exit-code"), unit("failed", "failed"), REMOVED]


def test_a_new_units_first_inactive_is_no_end() -> None:
    watch = UnitWatch("x", UNIT)
    for change in STARTING[:2]:
        watch.apply(change)
    assert not watch.ended and watch.outcome() is None
    for change in STARTING[2:]:
        watch.apply(change)
    assert watch.running and not watch.ended and watch.outcome() is Outcome.RUNNING
    for change in EXIT_3:
        watch.apply(change)
    assert watch.ended
    assert (watch.exec_main_code, watch.exec_main_status, watch.result) == (CLD_EXITED, 3, "exit-code")


def test_an_end_in_coalesced_signals_ends_a_launch() -> None:
    watch = UnitWatch("x", UNIT)
    for change in [service(84), unit("inactive", "dead"), service(0, CLD_EXITED, 5, "exit-code"),
                   unit("failed", "failed")]:  # fmt: skip
        watch.apply(change)
    assert watch.ended and watch.outcome() is Outcome.ENDED


def test_a_failed_start_job_is_an_outcome() -> None:
    watch = UnitWatch("x", UNIT)
    watch.apply(UnitChange(UNIT, ChangeKind.JOB_REMOVED, job_id=3, job_result="failed"))
    assert watch.outcome() is Outcome.JOB_FAILED


def test_a_removal_after_the_start_is_an_end() -> None:
    watch = UnitWatch("x", UNIT)
    watch.apply(REMOVED)
    assert not watch.ended  # the name's earlier unit, before this one started
    for change in STARTING:
        watch.apply(change)
    watch.apply(REMOVED)
    assert watch.ended


async def test_repeated_signals_are_one_exit_reported_after_launch_returned() -> None:
    runtime = SystemdRuntime("unix:path=/nonexistent")
    reports: list[tuple[str, ProcessHandle, ExitInfo]] = []
    runtime.set_exit_handler(lambda agent_id, handle, info: reports.append((agent_id, handle, info)))
    watch = UnitWatch("x", UNIT, started=True, running=True, handle=ProcessHandle(84, 1.0))
    runtime._watch(watch)
    for change in [*EXIT_3, *EXIT_3, unit("failed", "failed")]:
        runtime._on_change(change)
    assert [(a, h.pid, i.exit_code) for a, h, i in reports] == [("x", 84, 3)]
    assert watch.gone.is_set() and runtime.usage("x") is None

    # An end seen while launch() has not returned waits for it.
    pending = UnitWatch("y", UNIT.replace("x", "y"), launching=asyncio.get_running_loop().create_future())
    runtime._watch(pending)
    for change in STARTING + EXIT_3:
        runtime._on_change(UnitChange(pending.unit, change.kind, **_fields(change)))
    assert pending.exit_pending and len(reports) == 1


def _fields(change: UnitChange) -> dict[str, object]:
    names = ("active_state", "sub_state", "main_pid", "exec_main_code", "exec_main_status", "result",
             "job_id", "job_result")  # fmt: skip
    return {name: getattr(change, name) for name in names}


# -- journal ----------------------------------------------------------------------------------


def line(**fields: object) -> bytes:
    return json.dumps({"__REALTIME_TIMESTAMP": "1767323045123456", "_SYSTEMD_UNIT": UNIT, **fields}).encode()


def test_journal_lines_tell_stdout_from_stderr() -> None:
    out = parse_entry(line(MESSAGE="hello", PRIORITY="6", _TRANSPORT="stdout"), UNIT)
    assert out is not None and (out.text, out.stream) == ("hello", LogStream.STDOUT)
    assert out.time == datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    err = parse_entry(line(MESSAGE="oops", PRIORITY="4", _TRANSPORT="stdout"), UNIT)
    assert err is not None and err.stream is LogStream.STDERR
    odd = parse_entry(line(MESSAGE="?", PRIORITY="2", _TRANSPORT="stdout"), UNIT)
    assert odd is not None and odd.stream is LogStream.UNKNOWN


def test_journal_lines_of_others_and_odd_values() -> None:
    note = parse_entry(line(MESSAGE="Started OPMAS agent x.", PRIORITY="6", _SYSTEMD_UNIT="init.scope"), UNIT)
    assert note is not None and note.stream is LogStream.OPMASD
    native = parse_entry(line(MESSAGE="Failed to execute process", PRIORITY="3", _TRANSPORT="journal"), UNIT)
    assert native is not None and native.stream is LogStream.STDERR
    raw = parse_entry(line(MESSAGE=list(b"caf\xe9 \xff"), PRIORITY="6", _TRANSPORT="stdout"), UNIT)
    assert raw is not None and raw.text == "caf\ufffd \ufffd"
    too_big = parse_entry(line(MESSAGE=None, PRIORITY="6", _TRANSPORT="stdout"), UNIT)
    assert too_big is not None and too_big.text == ""
    no_time = parse_entry(json.dumps({"MESSAGE": "m", "__REALTIME_TIMESTAMP": "x"}).encode(), UNIT)
    assert no_time is not None and no_time.time is None
    # journald did not find the writer's cgroup (it had exited): systemd-cat's identifier says whose.
    orphan = json.dumps(
        {"MESSAGE": "why", "PRIORITY": "4", "_TRANSPORT": "stdout", "SYSLOG_IDENTIFIER": UNIT}
    )
    entry = parse_entry(orphan.encode(), UNIT)
    assert entry is not None and entry.stream is LogStream.STDERR
    assert parse_entry(b"not json", UNIT) is None
    assert parse_entry(b"[1, 2]", UNIT) is None


def test_journalctl_matches_the_units_lines_by_unit_or_identifier() -> None:
    argv = JournalSource(directory=Path("/j")).argv(UNIT, "--lines=5")
    assert argv[:2] == ["journalctl", "--directory=/j"] and "--lines=5" in argv
    matches = argv[argv.index(f"_SYSTEMD_UNIT={UNIT}") :]
    groups = " ".join(matches).split(" + ")
    assert groups[:3] == [f"_SYSTEMD_UNIT={UNIT}", f"SYSLOG_IDENTIFIER={UNIT}", f"_PID=1 UNIT={UNIT}"]


def test_the_parser_drops_an_overlong_line_and_goes_on() -> None:
    limit = len(line(MESSAGE="short"))
    parser = EntryParser(UNIT, line_max=limit)
    texts = [e.text for e in parser.feed(line(MESSAGE="short") + b"\n" + b"x" * 200 + b"\n")]
    texts += [e.text for e in parser.feed(line(MESSAGE="after") + b"\n" + b"y" * 200)]  # dropped now
    texts += [e.text for e in parser.feed(b"y" * 40 + b"\n" + line(MESSAGE="last")[:9])]  # its end too
    texts += [e.text for e in [*parser.feed(line(MESSAGE="last")[9:]), *parser.end()]]
    overlong = f"[a journal entry longer than {limit} bytes, not shown]"
    assert texts == ["short", overlong, "after", overlong, "last"]


# -- the agent's unit -------------------------------------------------------------------------


def test_the_agents_unit() -> None:
    limits = ResourceLimits(memory_max_bytes=64 << 20, cpu_quota_percent=150, tasks_max=0, open_files_max=99)
    request = LaunchRequest("my-agent/x y", ("/usr/bin/env", "$HOME", "%n 100%"), "/srv", {"A": "1"}, limits)
    unit = agent_unit(request, "0123456789abcdef0123456789abcdef", "/run/opmasd/systemd-env/x.env")
    props = {name: (sig, value) for name, sig, value in transient_properties(unit)}
    cat = [
        "/usr/bin/systemd-cat",
        "--identifier=opmas-agent-my\\x2dagent-x\\x20y.service",
        "--stderr-priority=warning",
        "--level-prefix=false",
        "--",
    ]
    # Plain ExecStart (systemd 252 cannot read back its own ExecStartEx=), with `$` as `$$`;
    # specifiers are not expanded in a property set over D-Bus.
    argv = [*cat, "/usr/bin/env", "$$HOME", "%n 100%"]
    assert props["ExecStart"] == ("a(sasb)", [("/usr/bin/systemd-cat", argv, False)])
    assert "ExecStartEx" not in props and "TasksMax" not in props
    assert props["Description"] == ("s", "OPMAS agent my-agent/x y (opmasd 0123456789abcdef0123456789abcdef)")
    assert props["MemoryMax"] == ("t", 64 << 20)
    assert props["CPUQuotaPerSecUSec"] == ("t", 1_500_000)
    assert props["LimitNOFILE"] == ("t", 99)
    # The environment in a file of opmasd's alone, never in the public Environment=.
    assert props["Environment"] == ("as", [])
    assert props["EnvironmentFiles"] == ("a(sb)", [("/run/opmasd/systemd-env/x.env", False)])
    assert props["WorkingDirectory"] == ("s", "/srv")
    assert props["Restart"] == ("s", "no") and props["StartLimitIntervalUSec"] == ("t", 0)
    assert props["KillMode"] == ("s", "control-group") and props["SendSIGKILL"] == ("b", True)
    assert props["CollectMode"] == ("s", "inactive-or-failed")
    plain = {p[0] for p in transient_properties(TransientUnit(("/bin/true",)))}
    assert "ExecStart" in plain and "ExecStartEx" not in plain


def test_programs_are_checked_below_the_root(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (tmp_path / "data").write_text("x")
    check_program(tmp_path, LaunchRequest("a", ("/bin/tool",), ""))
    check_program(tmp_path, LaunchRequest("a", ("tool",), "", {"PATH": "/nope:/bin"}))
    check_program(tmp_path, LaunchRequest("a", ("bin/tool",), "/"))
    with pytest.raises(Exception, match="not found"):
        check_program(tmp_path, LaunchRequest("a", ("/bin/missing",), ""))
    with pytest.raises(Exception, match="not executable"):
        check_program(tmp_path, LaunchRequest("a", ("/data",), ""))


# -- cgroups ----------------------------------------------------------------------------------


def tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_hybrid_hosts_cgroups(tmp_path: Path) -> None:
    cg = "sys/fs/cgroup"
    unit_dir = "system.slice/u.service"
    tree(tmp_path, {
        f"{cg}/memory/{unit_dir}/memory.usage_in_bytes": "4096\n",
        f"{cg}/pids/tasks": "",
        f"{cg}/unified/cgroup.procs": "",
        f"{cg}/unified/{unit_dir}/cgroup.procs": "7\n",
        f"{cg}/unified/{unit_dir}/cpu.stat": "usage_usec 2000000\nuser_usec 1\n",
        "proc/7/status": "Name:\tx\nThreads:\t3\n",
        "proc/7/fd/0": "",
    })  # fmt: skip
    layout = CgroupLayout.find(tmp_path)
    assert layout.memory_v1 and layout.controllers == {"memory", "pids"}
    assert layout.refusals(ResourceLimits(memory_max_bytes=1, tasks_max=1)) == []
    assert layout.refusals(ResourceLimits(cpu_quota_percent=10)) == [
        (
            "resources.cpu_quota_percent",
            "the systemd runtime cannot enforce it: this host has no cpu cgroup controller",
        )
    ]
    usage = UnitUsage(layout, "/" + unit_dir, 7)
    first = usage.sample(100.0)
    assert (first.rss_bytes, first.num_threads, first.open_fds, first.cpu_percent) == (4096, 3, 1, 0.0)
    tree(tmp_path, {f"{cg}/unified/{unit_dir}/cpu.stat": "usage_usec 2500000\n"})
    assert usage.sample(101.0).cpu_percent == pytest.approx(50.0)


def test_a_v2_hosts_cgroups_and_the_proc_fallback(tmp_path: Path) -> None:
    cg = "sys/fs/cgroup"
    tree(tmp_path, {
        f"{cg}/cgroup.controllers": "cpu memory pids io\n",
        f"{cg}/a.service/memory.current": "8192\n",
        f"{cg}/a.service/cgroup.procs": "5\n6\n",
        "proc/5/stat": "5 (a b) S " + "0 " * 10 + "100 50 0 0 0 0 0 0 0",
        "proc/6/stat": "6 (c) S " + "0 " * 10 + "10 40 0 0 0 0 0 0 0",
    })  # fmt: skip
    layout = CgroupLayout.find(tmp_path)
    assert not layout.memory_v1 and layout.controllers == {"cpu", "memory", "pids"}
    usage = UnitUsage(layout, "/a.service", 5)
    assert usage.memory_bytes() == 8192
    # No cpu.stat: the processes' utime + stime.
    assert usage.cpu_total() == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))


async def test_the_oom_verdict(tmp_path: Path) -> None:
    def watch() -> tuple[OomWatch, int, Path]:
        cgroup = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        cgroup.mkdir()
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return OomWatch(cgroup, fd), fd, cgroup

    async def ready() -> None:
        await asyncio.sleep(0.02)  # the loop runs the eventfd's reader

    # An OOM notification while the cgroup exists; then its removal.
    oom, fd, cgroup = watch()
    os.eventfd_write(fd, 1)
    await ready()
    cgroup.rmdir()
    os.eventfd_write(fd, 1)
    assert oom.verdict() is True
    oom.close()
    # No notification at all by the exit: no OOM.
    quiet, fd, cgroup = watch()
    cgroup.rmdir()
    assert quiet.verdict() is False
    quiet.close()
    # One notification, read only once the cgroup was gone: the removal alone, after a wait.
    removal, fd, cgroup = watch()
    cgroup.rmdir()
    os.eventfd_write(fd, 1)
    assert removal.verdict() is None
    assert await removal.settle(0.1) is False
    removal.close()
    # ... or an OOM read late, told by the removal's notification that follows.
    late, fd, cgroup = watch()
    cgroup.rmdir()
    os.eventfd_write(fd, 1)
    assert late.verdict() is None
    asyncio.get_running_loop().call_later(0.05, os.eventfd_write, fd, 1)
    assert await late.settle(1.0) is True
    late.close()
