"""An agent unit's output, read back from the journal by the journalctl program.

No Python binding of libsystemd installs without compiling, so journalctl is the reader (the
design accepts it: only starting units must be D-Bus). It runs as an asyncio subprocess, never
on the loop's time: `-o json` gives one entry per line; every line is read bounded
(_LINE_MAX: an entry past it is replaced by a note, never buffered whole), and a tail stops
after the lines asked for. Splitting and parsing the output (EntryParser) costs ~7 µs a short
line, ~0.8 s of the loop's time for a 100,000-line tail. Read line by line, how much was parsed
before the loop turned again was bounded only by the reader's buffer (up to ~380 KiB, ~14 ms;
2-3 ms of CPU measured); now it is parsed in steps of _STEP bytes with a turn of the loop after
each (~0.5 ms a step). Not in a worker thread: json.loads holds the GIL, and a tail parsed in
a thread stalled the loop longer (up to 45 ms, the loop waiting for the GIL at each switch
interval) and took twice as long. (A tail that big also makes a full GC pass, ~20 ms here:
the entries are new objects.)

stdout and stderr are told apart because the unit runs its program under systemd-cat
(runtime.systemd), which connects each to a journal stream of its own: stdout at priority 6
(info), stderr at 4 (warning), no `<N>` prefixes parsed. Entries about the unit that the
service manager wrote ("Started …", "Main process exited …") are the supervisor's notes,
shown as the opmasd stream as the process runtime shows its own launch and exit notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from opmasd.core.errors import BackendError
from opmasd.core.logs import LogEntry, LogStream

log = structlog.get_logger(__name__)

# The longest JSON line read whole; journald's own LineMax for stream lines is 48 KiB.
_LINE_MAX = 64 * 1024
# The most of journalctl's output read at once, and the most parsed in one step of the loop
# (~0.5 ms for 16 KiB of short entries; one line of up to _LINE_MAX may end in a step).
_READ_SIZE = 256 * 1024
_STEP = 16 * 1024
# The most lines one tail returns, whatever is asked.
TAIL_MAX = 100_000
# What of journalctl's complaints is kept for an error message.
_STDERR_MAX = 4096
# journalctl answers a tail within this, or is killed.
TAIL_TIMEOUT = 30.0
_EXIT_WAIT = 5.0
# The fields asked of journalctl (it adds __CURSOR and the timestamps itself).
_FIELDS = "MESSAGE,PRIORITY,_TRANSPORT,_SYSTEMD_UNIT,_SYSTEMD_USER_UNIT,SYSLOG_IDENTIFIER"
# syslog priorities: stdout's and stderr's streams (systemd-cat --stderr-priority=warning).
STDOUT_PRIORITY = 6
STDERR_PRIORITY = 4


@dataclass(frozen=True)
class JournalSource:
    """Which journal journalctl reads: the machine's own (no option), a directory of journal
    files (`--directory`, e.g. another systemd's /run/log/journal seen through
    /proc/PID/root), or the journals below a root (`--root`)."""

    directory: Path | None = None
    root: Path | None = None
    journalctl: str = "journalctl"

    def argv(self, unit: str, *more: str) -> list[str]:
        where = []
        if self.directory is not None:
            where.append(f"--directory={self.directory}")
        if self.root is not None:
            where.append(f"--root={self.root}")
        return [self.journalctl, *where, "--output=json", f"--output-fields={_FIELDS}", "--all",
                "--no-pager", "--quiet", *more, *unit_matches(unit)]  # fmt: skip


def unit_matches(unit: str) -> list[str]:
    """journalctl's matches for what the unit wrote and what was written about it ('+': or).

    Not `--unit`, which matches _SYSTEMD_UNIT: journald finds that from the writer's cgroup,
    read when it reads the first line of a stream, and a program that ended by then (one that
    printed why it cannot start, and exited) has its lines stored without it — a third of them
    in a burst measured here. systemd-cat names every line of its streams (SYSLOG_IDENTIFIER),
    whether journald found the cgroup or not.
    """
    groups = [
        [f"_SYSTEMD_UNIT={unit}"],
        [f"SYSLOG_IDENTIFIER={unit}"],
        ["_PID=1", f"UNIT={unit}"],  # the system manager's notes ("Started …")
        [f"COREDUMP_UNIT={unit}"],
        [f"_SYSTEMD_USER_UNIT={unit}"],
        [f"USER_UNIT={unit}"],  # a user manager's notes
    ]
    return [word for i, group in enumerate(groups) for word in (["+"] if i else []) + group]


def _text(value: object) -> str:
    """MESSAGE as JSON gives it: a string, an array of bytes (not valid UTF-8), or null (absent)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return bytes(value).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return ""
    return ""


def _priority(value: object) -> int | None:
    try:
        return int(value) if isinstance(value, str | int) else None
    except ValueError:
        return None


def _time(value: object) -> datetime | None:
    """__REALTIME_TIMESTAMP (microseconds since the epoch, as text) at millisecond precision."""
    try:
        usec = int(value) if isinstance(value, str | int) else None
    except ValueError:
        return None
    if usec is None:
        return None
    return datetime.fromtimestamp(usec // 1000 / 1000, UTC)


def stream_of(entry: dict[str, object], unit: str) -> LogStream:
    """Who wrote the entry: the agent's stdout or stderr, or the service manager (a note)."""
    priority = _priority(entry.get("PRIORITY"))
    if unit not in (
        entry.get("_SYSTEMD_UNIT"),
        entry.get("_SYSTEMD_USER_UNIT"),
        entry.get("SYSLOG_IDENTIFIER"),
    ):
        return LogStream.OPMASD  # the manager's notes about the unit, coredumps
    if entry.get("_TRANSPORT") == "stdout":
        if priority == STDOUT_PRIORITY:
            return LogStream.STDOUT
        return LogStream.STDERR if priority == STDERR_PRIORITY else LogStream.UNKNOWN
    # The agent's own journal or syslog messages (systemd-cat's, when it cannot exec): by level.
    if priority is None:
        return LogStream.UNKNOWN
    return LogStream.STDERR if priority <= STDERR_PRIORITY else LogStream.STDOUT


def parse_entry(line: bytes, unit: str) -> LogEntry | None:
    """One line of `journalctl -o json` as a LogEntry; None for a line that is not an entry."""
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict):
        return None
    return LogEntry(
        _text(entry.get("MESSAGE")), stream_of(entry, unit), _time(entry.get("__REALTIME_TIMESTAMP"))
    )


def _overlong(limit: int) -> LogEntry:
    return LogEntry(f"[a journal entry longer than {limit} bytes, not shown]", LogStream.UNKNOWN)


class EntryParser:
    """journalctl's output, fed chunk by chunk, as entries: split into lines, each parsed, and a
    line longer than _LINE_MAX dropped as its bytes come (never held whole) with a note in its
    place. One feed at a time (the chunks' order is the lines' order); any thread."""

    def __init__(self, unit: str, line_max: int = _LINE_MAX) -> None:
        self._unit = unit
        self._line_max = line_max
        self._partial = b""  # the start of a line whose end has not come yet
        self._skipping = False  # dropping the rest of an overlong line

    def feed(self, chunk: bytes) -> list[LogEntry]:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        entries: list[LogEntry] = []
        for line in lines:
            if self._skipping:
                self._skipping = False  # the end of the long line
            elif len(line) > self._line_max:
                entries.append(_overlong(self._line_max))
            elif (entry := parse_entry(line, self._unit)) is not None:
                entries.append(entry)
        if len(self._partial) > self._line_max:
            if not self._skipping:
                entries.append(_overlong(self._line_max))
            self._partial, self._skipping = b"", True
        return entries

    def end(self) -> list[LogEntry]:
        """The last line, when the output did not end with a newline."""
        line, self._partial = self._partial, b""
        entry = None if self._skipping or not line else parse_entry(line, self._unit)
        return [entry] if entry is not None else []


async def parsed_chunks(reader: asyncio.StreamReader, unit: str) -> AsyncGenerator[list[LogEntry], None]:
    """The entries the reader gives until EOF, parsed a step of at most _STEP bytes at a time
    with a turn of the loop after each, so that a long tail never holds the loop for long."""
    parser = EntryParser(unit)
    while chunk := await reader.read(_READ_SIZE):
        for start in range(0, len(chunk), _STEP):
            yield parser.feed(chunk[start : start + _STEP])
            await asyncio.sleep(0)  # the loop's other work runs between steps
    yield parser.end()


async def _capped(reader: asyncio.StreamReader, cap: int) -> bytes:
    """Everything the reader gives until EOF, keeping only the first `cap` bytes."""
    kept = b""
    while chunk := await reader.read(65536):
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
    return kept


class UnitJournal:
    """Reads units' entries from one JournalSource."""

    def __init__(self, source: JournalSource | None = None) -> None:
        self.source = source or JournalSource()

    async def _spawn(self, argv: Sequence[str]) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=_LINE_MAX,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot run {argv[0]} to read the journal: {exc.strerror or exc}") from exc

    async def tail(self, unit: str, lines: int, timeout: float = TAIL_TIMEOUT) -> list[LogEntry]:
        """The unit's last `lines` entries (at most TAIL_MAX), oldest first."""
        count = max(0, min(lines, TAIL_MAX))
        if count == 0:
            return []
        proc = await self._spawn(self.source.argv(unit, f"--lines={count}"))
        assert proc.stdout is not None and proc.stderr is not None
        entries: list[LogEntry] = []
        complaint = asyncio.ensure_future(_capped(proc.stderr, _STDERR_MAX))
        try:
            async with (
                asyncio.timeout(timeout),
                contextlib.aclosing(parsed_chunks(proc.stdout, unit)) as chunks,
            ):
                async for parsed in chunks:
                    entries.extend(parsed)
                    if len(entries) >= count:
                        return entries[:count]  # all that was asked: journalctl's exit does not matter
                said = await complaint
                code = await proc.wait()
        except TimeoutError:
            raise BackendError(f"journalctl did not answer within {timeout} s") from None
        finally:
            complaint.cancel()
            await _stop(proc)
        if code != 0:
            raise BackendError(f"journalctl exited {code}: {said.decode('utf-8', 'replace').strip()}")
        return entries

    async def follow(self, unit: str) -> AsyncIterator[LogEntry]:
        """The unit's entries from now on, until the caller stops (aclose): journalctl is killed then."""
        proc = await self._spawn(self.source.argv(unit, "--follow", "--lines=0"))
        assert proc.stdout is not None and proc.stderr is not None
        complaint = asyncio.ensure_future(_capped(proc.stderr, _STDERR_MAX))
        try:
            async with contextlib.aclosing(parsed_chunks(proc.stdout, unit)) as chunks:
                async for parsed in chunks:
                    for entry in parsed:
                        yield entry
            async with asyncio.timeout(_EXIT_WAIT):
                said = await complaint
                code = await proc.wait()
            if code != 0:
                raise BackendError(f"journalctl exited {code}: {said.decode('utf-8', 'replace').strip()}")
        finally:
            complaint.cancel()
            await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Kill journalctl if it still runs and reap it (bounded: it cannot ignore SIGKILL)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        async with asyncio.timeout(_EXIT_WAIT):
            await proc.wait()
    except TimeoutError:
        log.error("journalctl did not exit after SIGKILL", pid=proc.pid)
