"""AgentLogs on real files: tail edge cases, rotation and a follower across rotations."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from opmasd.runtime.logfiles import AgentLogs


def append(logs: AgentLogs, agent_id: str, text: str) -> None:
    fd = logs.open_for_child(agent_id)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def test_tail_edge_cases(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=10_000_000, backups=1)
    assert logs.tail("a", 3) == []
    append(logs, "a", "")
    assert logs.tail("a", 3) == []
    append(logs, "a", "one\ntwo\nthree")  # no final newline: the partial line counts
    assert logs.tail("a", 2) == ["two", "three"]
    assert logs.tail("a", 10) == ["one", "two", "three"]
    assert logs.tail("a", 0) == []
    # Long enough to need several backward blocks.
    append(logs, "a", "\n" + "".join(f"{i:08d}{'y' * 200}\n" for i in range(2000)))
    tail = logs.tail("a", 1500)
    assert len(tail) == 1500 and tail[0].startswith("00000500") and tail[-1].startswith("00001999")


def test_rotation_keeps_backups_and_tail_continues_into_them(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=100, backups=2)
    for generation in range(4):
        append(logs, "a", "".join(f"g{generation} line {i}\n" for i in range(20)))
        assert logs.rotate_oversized() == ["a"]
        assert (tmp_path / "a.log").stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "a.log.1", "a.log.2"]
    assert (tmp_path / "a.log.1").read_text().startswith("g3 line 0\n")
    assert (tmp_path / "a.log.2").read_text().startswith("g2 line 0\n")
    append(logs, "a", "now\n")
    assert logs.rotate_oversized() == []  # under the cap
    assert logs.tail("a", 3) == ["g3 line 18", "g3 line 19", "now"]
    assert logs.tail("a", 22)[0] == "g2 line 19"


def test_rotation_without_backups_just_empties(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=10, backups=0)
    append(logs, "a", "x" * 100)
    assert logs.rotate_oversized() == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]


def test_agent_ids_that_are_not_file_names_are_refused(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=10, backups=0)
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            logs.path(bad)


async def test_follow_sees_every_line_across_rotations(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=10, backups=1)
    append(logs, "a", "before\n")
    follower = logs.follow("a", poll_interval=0.01)
    append(logs, "a", "1\n2\npart")  # written before the first anext: still seen
    assert [await asyncio.wait_for(anext(follower), 2) for _ in range(2)] == ["1", "2"]
    append(logs, "a", "ial\n3\n")
    await asyncio.to_thread(logs.rotate, "a")  # the rest of "partial" and "3" are in .1 now
    append(logs, "a", "4\n")
    assert [await asyncio.wait_for(anext(follower), 2) for _ in range(3)] == ["partial", "3", "4"]
    await asyncio.to_thread(logs.rotate, "a")
    append(logs, "a", "5\n")
    assert await asyncio.wait_for(anext(follower), 2) == "5"
    await follower.aclose()  # type: ignore[attr-defined]
