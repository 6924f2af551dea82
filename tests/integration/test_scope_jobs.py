"""Making a scope, against a fake systemd manager: the start job awaited by its JobRemoved (even
one that comes before the reply), an earlier scope of the same name stopped when empty, a job
that fails or never ends refused — and the launch then fails without its program running.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from opmasd.core.errors import LaunchError
from opmasd.core.model import ResourceLimits
from opmasd.runtime import process_scopes
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.process_scopes import ProcessScopes, ScopeManager
from opmasd.runtime.systemd_dbus import UNIT_EXISTS, SystemdError
from opmasd.runtime.systemd_units import ChangeKind, UnitChange


class FakeManager(ScopeManager):
    """Answers StartTransientUnit and StopUnit; JobRemoved is sent before the reply returns."""

    def __init__(self, results: list[str], exists: int = 0) -> None:
        super().__init__(timeout=1)
        self.results = results  # each start job's result, in turn ("" = it never ends)
        self.exists = exists  # how many starts find a unit of that name loaded
        self.started: list[tuple[str, list[tuple[str, str, Any]]]] = []
        self.stopped: list[str] = []
        self.job = 100

    def _removed(self, unit: str, result: str) -> None:
        for listener in self._listeners:
            listener(UnitChange(unit, ChangeKind.JOB_REMOVED, job_id=self.job, job_result=result))

    async def start_scope(self, name: str, properties: list[tuple[str, str, Any]]) -> int:
        if self.exists:
            self.exists -= 1
            raise SystemdError(UNIT_EXISTS, f"Unit {name} was already loaded")
        self.job += 1
        self.started.append((name, properties))
        result = self.results.pop(0)
        if result:
            self._removed(name, result)
        return self.job

    async def stop_unit(self, name: str, mode: str = "replace") -> str:
        self.job += 1
        self.stopped.append(name)
        self._removed(name, "done")
        return f"/org/freedesktop/systemd1/job/{self.job}"


@pytest.fixture(autouse=True)
def moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PID shows in the scope it was put in (no real systemd moves it here)."""
    monkeypatch.setattr(process_scopes, "procstat_cgroup", lambda pid: "/system.slice/opmas-proc-a.scope")


def scopes_of(manager: FakeManager, base: Path, timeout: float = 1.0) -> ProcessScopes:
    return ProcessScopes(manager, base, "system.slice", timeout, frozenset({"pids"}))


def waiting_child(scopes: ProcessScopes, marker: Path) -> tuple[subprocess.Popen[bytes], Any]:
    program = ("/bin/sh", "-c", 'echo ran > "$0"', str(marker))
    request, gate = scopes.gated(LaunchRequest("a", program, "", resources=ResourceLimits(tasks_max=9)))
    return subprocess.Popen(request.command, stdin=gate.read, start_new_session=True), gate


async def test_the_child_runs_once_its_scope_started(tmp_path: Path) -> None:
    manager = FakeManager(["done"])
    scopes = scopes_of(manager, tmp_path)
    popen, gate = waiting_child(scopes, tmp_path / "marker")
    await scopes.place("a", popen, gate, lambda *_: None)
    assert popen.wait(timeout=5) == 0 and (tmp_path / "marker").read_text() == "ran\n"
    name, properties = manager.started[0]
    assert name == "opmas-proc-a.scope"
    assert ("PIDs", "au", [popen.pid]) in properties and ("TasksMax", "t", 9) in properties
    assert ("Slice", "s", "system.slice") in properties
    assert scopes.cgroups.placing == set()


async def test_an_empty_earlier_scope_of_the_name_is_stopped_first(tmp_path: Path) -> None:
    manager = FakeManager(["done"], exists=1)
    scopes = scopes_of(manager, tmp_path)  # no cgroup.procs under tmp_path: the old one is empty
    popen, gate = waiting_child(scopes, tmp_path / "marker")
    await scopes.place("a", popen, gate, lambda *_: None)
    assert manager.stopped == ["opmas-proc-a.scope"] and len(manager.started) == 1
    assert popen.wait(timeout=5) == 0


@pytest.mark.parametrize("result", ["failed", ""])
async def test_a_start_job_that_fails_or_never_ends_fails_the_launch(tmp_path: Path, result: str) -> None:
    scopes = scopes_of(FakeManager([result]), tmp_path, timeout=0.2)
    popen, gate = waiting_child(scopes, tmp_path / "marker")
    notes: list[str] = []
    with pytest.raises(LaunchError, match="cannot move agent a"):
        await scopes.place("a", popen, gate, lambda _agent, text: notes.append(text))
    assert popen.returncode is not None  # killed and reaped
    assert not (tmp_path / "marker").exists()  # the program never ran
    assert notes and "not started" in notes[0]
    assert scopes.cgroups.placing == set()


async def test_a_second_launch_while_one_is_placed_is_refused(tmp_path: Path) -> None:
    scopes = scopes_of(FakeManager([]), tmp_path)
    scopes.cgroups.placing.add("a")
    with pytest.raises(LaunchError, match="being launched already"):
        scopes.gated(LaunchRequest("a", ("/bin/true",), ""))
