#!/usr/bin/env python3
"""Replay parsed device logs (JSON lines) onto NATS, one record per message on `logs.<device>`.

    .venv/bin/python agents/tools/replay_logs.py agents/samples/device-logs.jsonl \\
        [--nats-url nats://127.0.0.1:4222] [--subject-prefix logs] \\
        [--rate 20 | --as-fast-as-possible | --speed 60] [--watch-findings 5]

Pacing: `--rate N` sends N records a second (default 20); `--speed X` keeps the records' own
spacing, X times faster; `--as-fast-as-possible` does not wait at all. Records keep their
timestamps, so time-window detectors (auth-failures) judge them by record time.

`--watch-findings S` subscribes to `findings.>` before replaying and prints every finding as a
JSON line on stdout (with its subject), until S seconds after the last record. Progress and
errors go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

# A device name becomes one subject token: dots (FQDNs), spaces and wildcards are replaced.
_NOT_TOKEN = re.compile(r"[\s.*>]+")


def subject_for(prefix: str, record: dict[str, Any]) -> str:
    device = record.get("device")
    token = _NOT_TOKEN.sub("_", device).strip("_") if isinstance(device, str) else ""
    return f"{prefix}.{token or 'unknown'}"


def read_records(stream: TextIO, name: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines stream; bad lines are reported on stderr and skipped."""
    for number, line in enumerate(stream, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            print(f"{name}:{number}: skipped, not JSON: {exc}", file=sys.stderr)
            continue
        if not isinstance(record, dict):
            print(f"{name}:{number}: skipped, not a JSON object", file=sys.stderr)
            continue
        yield record


def record_time(record: dict[str, Any]) -> float | None:
    raw = record.get("timestamp")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        return None


class Pacer:
    """When each record is due: at a fixed rate, at the records' own pace (sped up), or now."""

    def __init__(self, rate: float | None, speed: float | None) -> None:
        self._rate, self._speed = rate, speed
        self._start = time.monotonic()
        self._sent = 0
        self._first: float | None = None
        self.untimed = 0  # --speed: records without a usable timestamp, sent without waiting

    async def wait(self, record: dict[str, Any]) -> None:
        due = self._start
        if self._rate:
            due += self._sent / self._rate
        elif self._speed:
            when = record_time(record)
            if when is None:
                self.untimed += 1
            else:
                self._first = when if self._first is None else self._first
                due += max(0.0, when - self._first) / self._speed
        self._sent += 1
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def replay(args: argparse.Namespace, stream: TextIO) -> int:
    nc = NATS()
    try:
        # A tool, not an agent: fail fast and say so rather than retry forever.
        await nc.connect(args.nats_url, connect_timeout=3, allow_reconnect=False, name="opmas-replay-logs")
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"cannot connect to NATS at {args.nats_url}: {exc!r}", file=sys.stderr)
        return 1
    findings = 0

    async def show(msg: Msg) -> None:
        nonlocal findings
        findings += 1
        try:
            payload = json.loads(msg.data)
        except ValueError:
            payload = {"raw": msg.data.decode(errors="replace")}
        if not isinstance(payload, dict):
            payload = {"data": payload}
        print(json.dumps({"subject": msg.subject, **payload}), flush=True)

    if args.watch_findings is not None:
        await nc.subscribe(args.findings_subject, cb=show)
        await nc.flush()
    pacer = Pacer(None if args.as_fast_as_possible or args.speed else args.rate, args.speed)
    sent, started = 0, time.monotonic()
    for record in read_records(stream, args.file):
        await pacer.wait(record)
        await nc.publish(subject_for(args.subject_prefix, record), json.dumps(record).encode())
        sent += 1
    await nc.flush()
    print(f"replayed {sent} records in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    if pacer.untimed:
        print(f"{pacer.untimed} records had no usable timestamp and were not paced", file=sys.stderr)
    if args.watch_findings is not None:
        await asyncio.sleep(args.watch_findings)
        print(f"{findings} findings on {args.findings_subject}", file=sys.stderr)
    await nc.drain()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file", help="JSON lines, one parsed log record per line ('-' for stdin)")
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL") or "nats://127.0.0.1:4222")
    parser.add_argument(
        "--subject-prefix", default="logs", help="records go to <prefix>.<device> (default logs)"
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=20.0, help="records per second (default 20)")
    pace.add_argument("--as-fast-as-possible", action="store_true", help="no pacing at all")
    pace.add_argument("--speed", type=float, help="keep the records' own spacing, this many times faster")
    parser.add_argument(
        "--watch-findings",
        type=float,
        metavar="SECONDS",
        help="print findings until SECONDS after the replay",
    )
    parser.add_argument("--findings-subject", default="findings.>", help="what --watch-findings watches")
    args = parser.parse_args(argv)
    for name in ("rate", "speed", "watch_findings"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (name != "watch_findings" and value == 0)):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stream = sys.stdin if args.file == "-" else Path(args.file).open(encoding="utf-8")
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        with stream:
            return asyncio.run(replay(args, stream))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
