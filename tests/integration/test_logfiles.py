"""Agent logs on real files: the stored format, the relay's capped writer, tail and follow.

The writer is the relay's own LogFile class, driven directly here (no process): what it does
at the cap and what readers see across its rename rotations.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opmasd.core.logs import LogEntry, LogStream
from opmasd.runtime import logformat
from opmasd.runtime.logfiles import AgentLogs, parse_entry
from opmasd.runtime.logwriter import LogFile, Settings

STAMPER = logformat.Stamper()


def stored(lines: list[str], tag: bytes = logformat.STDOUT) -> bytes:
    return logformat.format_lines(STAMPER.prefix(tag), [line.encode() for line in lines])


def writer(directory: Path, max_bytes: int, backups: int, agent_id: str = "a") -> LogFile:
    return LogFile(directory, agent_id, Settings(max_bytes, backups))


def texts(entries: list[LogEntry]) -> list[str]:
    return [entry.text for entry in entries]


def test_the_stored_format_round_trips() -> None:
    raw = logformat.format_lines(STAMPER.prefix(logformat.STDERR, 1_796_000_000.5), [b"oops: x"])
    assert raw == b"2026-11-30T00:53:20.500Z err oops: x\n"
    entry = parse_entry(raw.rstrip(b"\n"))
    assert entry == LogEntry("oops: x", LogStream.STDERR, datetime(2026, 11, 30, 0, 53, 20, 500000, UTC))
    # Lines from before the format, or that only look like it, are plain text.
    for line in (b"plain old line", b"2026-11-30T01:33:20.123Z xyz not a tag", b""):
        assert parse_entry(line) == LogEntry(line.decode())
    assert parse_entry(b"2026-11-30T01:33:20.123Z out ").text == ""


def test_tail_edge_cases(tmp_path: Path) -> None:
    logs = AgentLogs(tmp_path, max_bytes=10_000_000, backups=1)
    assert logs.tail("a", 3) == []
    (tmp_path / "a.log").write_bytes(b"")
    assert logs.tail("a", 3) == []
    (tmp_path / "a.log").write_bytes(stored(["one", "two"]) + b"three")  # a partial last line counts
    assert texts(logs.tail("a", 2)) == ["two", "three"]
    assert texts(logs.tail("a", 10)) == ["one", "two", "three"]
    assert logs.tail("a", 0) == []
    # Long enough to need several backward blocks.
    (tmp_path / "a.log").write_bytes(stored([f"{i:08d}{'y' * 200}" for i in range(2000)]))
    tail = logs.tail("a", 1500)
    assert len(tail) == 1500 and tail[0].text.startswith("00000500") and tail[-1].text.startswith("00001999")
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            logs.path(bad)


def test_the_writer_rotates_by_renaming_before_the_cap(tmp_path: Path) -> None:
    log_file = writer(tmp_path, max_bytes=1000, backups=2)
    for generation in range(10):
        log_file.write(stored([f"g{generation} line {i:02d}" for i in range(20)]))
        assert (tmp_path / "a.log").stat().st_size <= 1000
    log_file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "a.log.1", "a.log.2"]
    everything = b"".join((tmp_path / name).read_bytes() for name in ("a.log.2", "a.log.1", "a.log"))
    lines = [parse_entry(raw).text for raw in everything.splitlines()]
    # Whole lines only, none lost from the oldest kept to the last; files filled up to the cap.
    expected = [f"g{g} line {i:02d}" for g in range(10) for i in range(20)]
    assert lines == expected[-len(lines) :]
    assert all((tmp_path / name).stat().st_size > 1000 - 50 for name in ("a.log.2", "a.log.1"))
    logs = AgentLogs(tmp_path, max_bytes=1000, backups=2)
    assert texts(logs.tail("a", len(lines) + 10)) == lines  # tail continues into the backups


def test_without_backups_the_old_content_is_dropped(tmp_path: Path) -> None:
    log_file = writer(tmp_path, max_bytes=100, backups=0)
    log_file.write(stored(["x" * 40]) * 5)
    log_file.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]
    assert (tmp_path / "a.log").stat().st_size <= 100


def test_a_line_longer_than_a_tiny_cap_is_split(tmp_path: Path) -> None:
    log_file = writer(tmp_path, max_bytes=20, backups=3)
    log_file.write(b"0123456789" * 5 + b"\n")
    log_file.close()
    sizes = [(tmp_path / name).stat().st_size for name in ("a.log.2", "a.log.1", "a.log")]
    assert sizes == [20, 20, 11] and not (tmp_path / "a.log.3").exists()


def test_a_lowered_backup_count_drops_the_extra_file(tmp_path: Path) -> None:
    writer(tmp_path, max_bytes=10, backups=3).write(b"123456789\n" * 5)
    assert (tmp_path / "a.log.3").exists()
    writer(tmp_path, max_bytes=10, backups=1).write(b"123456789\n" * 2)
    assert not (tmp_path / "a.log.3").exists() and not (tmp_path / "a.log.2").exists()


async def test_follow_sees_every_line_once_across_rotations(tmp_path: Path) -> None:
    log_file = writer(tmp_path, max_bytes=200, backups=3)
    log_file.write(stored(["before"]))
    logs = AgentLogs(tmp_path, max_bytes=200, backups=3)
    follower = logs.follow("a", poll_interval=0.01)
    log_file.write(stored(["1", "2"]))  # written before the first anext: still seen
    assert texts([await asyncio.wait_for(anext(follower), 2) for _ in range(2)]) == ["1", "2"]
    # Several rotations between two looks of the follower: it reads the files in order.
    numbers = [f"{i:03d} {'z' * 30}" for i in range(10)]
    log_file.write(stored(numbers))
    assert (tmp_path / "a.log.3").exists()
    got = [await asyncio.wait_for(anext(follower), 2) for _ in range(10)]
    assert texts(got) == numbers
    log_file.write(stored(["last"], logformat.STDERR))
    entry = await asyncio.wait_for(anext(follower), 2)
    assert (entry.text, entry.stream) == ("last", LogStream.STDERR)
    await follower.aclose()  # type: ignore[attr-defined]


async def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    follower = AgentLogs(tmp_path, max_bytes=100, backups=0).follow("a", poll_interval=0.01)
    pending = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0.05)
    writer(tmp_path, max_bytes=100, backups=0).write(stored(["hello"]))
    assert (await asyncio.wait_for(pending, 2)).text == "hello"
    await follower.aclose()  # type: ignore[attr-defined]
