"""A big journal tail is parsed in bounded steps with a turn of the loop after each: the loop
never waits for a whole tail (runtime/systemd_journal.py, parsed_chunks)."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from opmasd.core.logs import LogEntry
from opmasd.runtime import systemd_journal
from opmasd.runtime.systemd_journal import EntryParser, parsed_chunks

UNIT = "opmas-agent-x.service"


def entry_line(n: int) -> bytes:
    fields = {"__REALTIME_TIMESTAMP": "1767323045123456", "_SYSTEMD_UNIT": UNIT, "_TRANSPORT": "stdout"}
    return json.dumps({**fields, "MESSAGE": f"line {n}", "PRIORITY": "6"}).encode() + b"\n"


async def test_a_big_tail_is_parsed_in_steps_with_the_loop_turning_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    turns = 0
    done = False

    async def other_work() -> None:  # what else the loop runs: counts its turns
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    steps: list[tuple[int, int]] = []  # (bytes fed, the loop's turns so far)
    feed = EntryParser.feed

    def counted(self: EntryParser, chunk: bytes) -> list[LogEntry]:
        steps.append((len(chunk), turns))
        return feed(self, chunk)

    monkeypatch.setattr(EntryParser, "feed", counted)
    output = b"".join(entry_line(n) for n in range(20_000))  # ~3 MB, as journalctl would send it
    reader = asyncio.StreamReader(limit=64 * 1024)
    reader.feed_data(output)  # all there at once: nothing would make the reader wait
    reader.feed_eof()
    worker = asyncio.ensure_future(other_work())
    await asyncio.sleep(0)
    texts = [entry.text async for chunk in parsed_chunks(reader, UNIT) for entry in chunk]
    done = True
    await worker
    assert texts == [f"line {n}" for n in range(20_000)]
    assert len(steps) >= len(output) // systemd_journal._STEP
    assert max(size for size, _ in steps) <= systemd_journal._STEP
    # Between any two steps the loop ran its other work.
    assert all(later > earlier for (_, earlier), (_, later) in itertools.pairwise(steps))
