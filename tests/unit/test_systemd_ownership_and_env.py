"""The systemd runtime's pure parts added for issue 12: the environment file's encoding and
directory, the ownership mark and instance id, refusals at registration, and the resync after a
lost connection (against a fake manager). Real systemd behaviour is in
tests/integration/test_systemd_hardening.py."""

from __future__ import annotations

import stat
from datetime import UTC
from pathlib import Path

import pytest

from opmasd.core.errors import InvalidArgument
from opmasd.core.model import AgentSpec, ResourceLimits, RuntimeKind
from opmasd.manager.runtimes import RuntimeRouter
from opmasd.runtime.systemd import SystemdRuntime
from opmasd.runtime.systemd_dbus import NO_SUCH_UNIT, SystemdError
from opmasd.runtime.systemd_env import EnvironmentFiles, encode_environment, file_name
from opmasd.runtime.systemd_owner import describe, is_foreign, load_instance_id, owner_of
from opmasd.runtime.systemd_reconnect import GONE_RESULT, resync
from opmasd.runtime.systemd_units import ChangeKind, TransientUnit, UnitChange, UnitState, exec_argument
from opmasd.runtime.systemd_watch import UnitWatch

INSTANCE = "0123456789abcdef0123456789abcdef"


def test_values_are_double_quoted_with_backslash_and_quote_escaped() -> None:
    text = encode_environment({"A": 'a"b', "B": "a\\b", "C": "$X ${Y} `z` 'q'", "D": " x\ny ", "E": "#"})
    assert text == b'A="a\\"b"\nB="a\\\\b"\nC="$X ${Y} `z` \'q\'"\nD=" x\ny "\nE="#"\n'


def test_what_cannot_be_carried_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="'A B'"):
        encode_environment({"A B": "x"})
    with pytest.raises(ValueError, match="SECRET holds a NUL"):
        encode_environment({"SECRET": "a\0b"})


def test_exec_arguments_escape_dollars_only() -> None:
    assert exec_argument("$HOME ${X} $$ %n 100%") == "$$HOME $${X} $$$$ %n 100%"


async def test_environment_files_are_private_and_swept(tmp_path: Path) -> None:
    files = EnvironmentFiles(Path("/run/x/systemd-env"), root=tmp_path)
    path = await files.write("opmas-agent-a.service", {"SECRET": "s"})
    assert path == f"/run/x/systemd-env/{file_name('opmas-agent-a.service')}"
    here = tmp_path / path.lstrip("/")
    assert here.read_bytes() == b'SECRET="s"\n'
    assert stat.S_IMODE(here.stat().st_mode) == 0o600
    assert stat.S_IMODE(here.parent.stat().st_mode) == 0o700
    await files.write("opmas-agent-b.service", {})
    (here.parent / ".left.123").write_text("half-written")
    removed = files.sweep(["opmas-agent-a.service", "other.service"])
    assert sorted(removed) == sorted([".left.123", file_name("opmas-agent-b.service")])
    assert here.exists()
    files.remove("opmas-agent-a.service")
    files.remove("opmas-agent-a.service")  # gone already: nothing to say
    assert not here.exists()


async def test_a_loose_environment_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "env"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    await EnvironmentFiles(directory).write("u.service", {"A": "1"})
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_the_ownership_mark_round_trips() -> None:
    described = describe("my-agent", INSTANCE)
    assert described == f"OPMAS agent my-agent (opmasd {INSTANCE})"
    assert owner_of(described) == INSTANCE
    assert owner_of("OPMAS agent my-agent") is None  # made before marks: ours (upgrade path)
    assert not is_foreign("OPMAS agent my-agent", INSTANCE)
    assert not is_foreign(described, INSTANCE)
    assert is_foreign(described, "f" * 32)
    assert describe("a", "") == "OPMAS agent a"


def test_the_instance_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = load_instance_id(tmp_path)
    assert len(first) == 32 and load_instance_id(tmp_path) == first
    assert stat.S_IMODE((tmp_path / "instance-id").stat().st_mode) == 0o600
    (tmp_path / "instance-id").write_text("not an id\n")
    with pytest.raises(ValueError, match="instance id"):
        load_instance_id(tmp_path)


def test_an_id_too_long_for_a_unit_name_is_refused_as_spec_id() -> None:
    runtime = SystemdRuntime("unix:path=/nonexistent")
    spec = AgentSpec(name="long", command=("/bin/true",), runtime=RuntimeKind.SYSTEMD)
    router = RuntimeRouter({RuntimeKind.SYSTEMD: runtime}, lambda agent_id: spec)
    router.check_spec(spec, agent_id="a-b")
    with pytest.raises(InvalidArgument) as refused:
        router.check_spec(spec, agent_id="a" + "-" * 62)
    [violation] = refused.value.violations
    assert violation.field == "spec.id"
    assert "unit name of 269 characters (max 255)" in violation.description
    runtime._foreign["opmas-agent-taken.service"] = INSTANCE
    [(field, why)] = runtime.id_refusals("taken")
    assert field == "id" and f"belongs to another opmasd on this systemd (instance {INSTANCE})" in why


def test_a_cpu_quota_systemd_cannot_express_is_refused() -> None:
    runtime = SystemdRuntime("unix:path=/nonexistent")
    [(field, why)] = runtime.refusals(ResourceLimits(cpu_quota_percent=0.0001))
    assert field == "resources.cpu_quota_percent" and "below what systemd can enforce (0.1%" in why
    assert runtime.refusals(ResourceLimits(cpu_quota_percent=0.1)) == []


class FakeManager:
    def __init__(self, states: dict[str, UnitState]) -> None:
        self.states = states

    async def unit_state(self, name: str) -> UnitState:
        if name not in self.states:
            raise SystemdError(NO_SUCH_UNIT, f"unit {name} not loaded")
        return self.states[name]


async def test_resync_reports_what_ended_while_disconnected() -> None:
    running = UnitWatch("a", "ua", active_state="active", sub_state="running", main_pid=5, started=True,
                        running=True)  # fmt: skip
    failed = UnitWatch("b", "ub", active_state="active", sub_state="running", main_pid=6, started=True,
                       running=True)  # fmt: skip
    gone = UnitWatch("c", "uc", active_state="active", sub_state="running", main_pid=7, started=True,
                     running=True)  # fmt: skip
    still = UnitState("ua", "loaded", "active", "running", 5, 0, 0, "success", "", None, None, 0)
    ended = UnitState("ub", "loaded", "failed", "failed", 0, 1, 3, "exit-code", "", None, None, 0)
    watches = {w.unit: w for w in (running, failed, gone)}
    changes: list[UnitChange] = []

    def apply(change: UnitChange) -> None:
        changes.append(change)
        watches[change.unit].apply(change)

    count = await resync(FakeManager({"ua": still, "ub": ended}), watches.values(), apply)  # type: ignore[arg-type]
    assert count == 2
    assert not running.ended
    assert failed.ended and (failed.exec_main_code, failed.exec_main_status) == (1, 3)
    assert gone.ended and gone.result == GONE_RESULT
    assert [c.kind for c in changes if c.unit == "uc"] == [ChangeKind.UNIT_REMOVED]


async def test_a_call_systemd_dropped_while_re_executing_is_sent_again() -> None:
    from opmasd.runtime.systemd_dbus import BUS_NO_REPLY, NO_REPLY, SystemdManager

    manager = SystemdManager(timeout=1.0)
    calls: list[str] = []

    async def once(destination: str, path: str, interface: str, member: str, *_: object) -> list[object]:
        calls.append(member)
        if len(calls) < 3:
            raise SystemdError(
                BUS_NO_REPLY, "Message recipient disconnected from message bus without replying"
            )
        return ["/org/freedesktop/systemd1/job/1"]

    manager._call_once = once  # type: ignore[method-assign,assignment]
    assert await manager.stop_unit("u.service") == "/org/freedesktop/systemd1/job/1"
    assert calls == ["StopUnit"] * 3
    calls.clear()
    with pytest.raises(SystemdError) as raised:  # a start is never sent twice blindly
        await manager.start_transient_unit("u.service", TransientUnit(("/bin/true",)))
    assert raised.value.name == BUS_NO_REPLY and calls == ["StartTransientUnit"]
    manager.timeout = 0.1

    async def never(*_: object) -> list[object]:
        raise SystemdError(BUS_NO_REPLY, "gone")

    manager._call_once = never  # type: ignore[method-assign,assignment]
    with pytest.raises(SystemdError) as raised:
        await manager.stop_unit("u.service")
    assert raised.value.name == NO_REPLY and "systemd did not come back" in raised.value.text


async def test_a_collected_units_exit_is_read_from_the_journal_since_the_loss() -> None:
    from datetime import datetime, timedelta

    from opmasd.core.logs import LogEntry, LogStream
    from opmasd.runtime.systemd_reconnect import journal_status

    lost = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    note = "opmas-agent-a.service: Main process exited, code={}, status={}"
    entries = [
        LogEntry(note.format("exited", "3/NOTIMPLEMENTED"), LogStream.OPMASD, lost - timedelta(minutes=5)),
        LogEntry("bye", LogStream.STDOUT, lost + timedelta(seconds=1)),
        LogEntry(note.format("killed", "9/KILL"), LogStream.OPMASD, lost + timedelta(seconds=2)),
        LogEntry("opmas-agent-a.service: Failed with result 'signal'.", LogStream.OPMASD, lost),
    ]

    class Journal:
        def __init__(self, entries: list[LogEntry]) -> None:
            self.entries = entries

        async def tail(self, unit: str, lines: int, timeout: float = 0) -> list[LogEntry]:
            return self.entries

    assert await journal_status(Journal(entries), "u", lost) == (2, 9)  # type: ignore[arg-type]
    # An exit older than the loss is an earlier unit of the same name: not this one's.
    assert await journal_status(Journal(entries[:2]), "u", lost) is None  # type: ignore[arg-type]
    watch = UnitWatch("a", "ua", active_state="active", sub_state="running", main_pid=5, started=True,
                      running=True)  # fmt: skip

    async def lookup(unit: str) -> tuple[int, int] | None:
        return (2, 9)

    await resync(FakeManager({}), [watch], watch.apply, lookup)  # type: ignore[arg-type]
    assert watch.ended and watch.exit_info(False, lost).reason == "killed by SIGKILL"


async def test_a_lost_connection_is_made_again_with_backoff() -> None:
    import asyncio

    from opmasd.runtime.systemd_reconnect import RECONNECT_MAX, Reconnector

    class Link:
        def __init__(self) -> None:
            self.down = asyncio.Event()
            self.down.set()  # lost at once

        async def wait_disconnected(self) -> None:
            await self.down.wait()

    link = Link()
    events: list[str] = []
    slept: list[float] = []
    attempts = 0
    done = asyncio.Event()

    async def reconnect() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 8:
            raise SystemdError("org.freedesktop.DBus.Error.NoServer", "no bus yet")
        link.down.clear()

    async def back() -> None:
        events.append("back")
        done.set()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    reconnector = Reconnector(link, "system", reconnect, lambda: events.append("lost"), back, sleep=sleep)  # type: ignore[arg-type]
    reconnector.start()
    await asyncio.wait_for(done.wait(), 5)
    await reconnector.aclose()
    assert events == ["lost", "back"] and reconnector.reconnects == 1
    assert slept == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, RECONNECT_MAX, RECONNECT_MAX]
