"""Brute-force detection: authentication failures per (device, client) in a sliding window.

Pure logic on plain records — no NATS, no clock: time comes from each record's own
`timestamp`, so a replay of yesterday's logs finds what a live feed would have found.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opmas_agent import parse_timestamp, timestamp

AUTH_FAILURE = "auth_failure"
MAX_USERS = 20  # user names listed in one finding; a dictionary attack tries thousands


@dataclass(frozen=True)
class AuthFailureFinding:
    """Threshold reached: `count` failures from `client` on `device` within the window."""

    device: str
    client: str
    count: int
    window_seconds: float
    first_seen: datetime
    last_seen: datetime
    users: tuple[str, ...]
    host: str = ""

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "finding": "auth_failures",
            "severity": "high",
            "device": self.device,
            "client": self.client,
            "count": self.count,
            "window_seconds": self.window_seconds,
            "first_seen": timestamp(self.first_seen),
            "last_seen": timestamp(self.last_seen),
            "users": list(self.users),
        }
        if self.host:
            body["host"] = self.host
        return body


@dataclass
class _Pair:
    """Failures of one (device, client) inside the window, oldest first."""

    times: list[datetime] = field(default_factory=list)
    users: list[str] = field(default_factory=list)  # parallel to `times`
    last_alert: datetime | None = None
    host: str = ""


@dataclass
class DetectorStats:
    records: int = 0
    auth_failures: int = 0
    ignored: int = 0  # an auth failure without device or client: nothing to key it on
    bad_timestamp: int = 0
    findings: int = 0


class AuthFailureDetector:
    """Counts failures per (device, client); a finding when `threshold` fall within `window`.

    After a finding, the same pair is reported again only once a whole window has passed since
    (at most one finding per pair per window), so a long attack is a finding a window, not a
    finding a failure.

    Args:
        threshold: failures within the window that make a finding.
        window: the window, in seconds of record time.
        max_events: failures kept per pair; beyond it the oldest are dropped (a flood must
            not exhaust memory), so `count` saturates there.
    """

    def __init__(self, threshold: int = 5, window: float = 60.0, *, max_events: int = 10_000) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        self.threshold = threshold
        self.window = window
        self._span = timedelta(seconds=window)
        self._max_events = max(max_events, threshold)
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._latest: datetime | None = None
        self.stats = DetectorStats()

    @property
    def tracked(self) -> int:
        """(device, client) pairs with failures inside their window."""
        return len(self._pairs)

    def observe(
        self, record: Mapping[str, Any], received_at: datetime | None = None
    ) -> AuthFailureFinding | None:
        """Take one parsed log record; the finding it completes, if any.

        The record's `timestamp` is its time; `received_at` stands in only when the record has
        no usable timestamp (and without it such a record is skipped).
        """
        self.stats.records += 1
        if record.get("event") != AUTH_FAILURE:
            return None
        self.stats.auth_failures += 1
        device, client = record.get("device"), record.get("client")
        if not isinstance(device, str) or not device or not isinstance(client, str) or not client:
            self.stats.ignored += 1
            return None
        when = self._time_of(record, received_at)
        if when is None:
            return None
        user, host = record.get("user"), record.get("host")
        user = user if isinstance(user, str) else ""
        return self._add(device, client, when, user, host if isinstance(host, str) else "")

    def _time_of(self, record: Mapping[str, Any], received_at: datetime | None) -> datetime | None:
        raw = record.get("timestamp")
        if isinstance(raw, str):
            try:
                return parse_timestamp(raw)
            except ValueError:
                # Counted (the agent logs it); the arrival time stands in, as for no timestamp.
                self.stats.bad_timestamp += 1
                return received_at
        self.stats.bad_timestamp += 1
        return received_at

    def _add(
        self, device: str, client: str, when: datetime, user: str, host: str
    ) -> AuthFailureFinding | None:
        pair = self._pairs.setdefault((device, client), _Pair())
        if host:
            pair.host = host
        # Replays and multi-path syslog deliver slightly out of order: keep the list sorted.
        at = bisect.bisect_right(pair.times, when)
        pair.times.insert(at, when)
        pair.users.insert(at, user)
        newest = pair.times[-1]
        if self._latest is None or newest > self._latest:
            self._latest = newest
        # The window is (newest - window, newest]: a failure exactly `window` old has left it.
        cut = max(bisect.bisect_right(pair.times, newest - self._span), len(pair.times) - self._max_events)
        del pair.times[:cut], pair.users[:cut]
        if len(pair.times) < self.threshold:
            return None
        if pair.last_alert is not None and newest - pair.last_alert < self._span:
            return None
        pair.last_alert = newest
        self.stats.findings += 1
        return AuthFailureFinding(
            device=device,
            client=client,
            count=len(pair.times),
            window_seconds=self.window,
            first_seen=pair.times[0],
            last_seen=newest,
            users=tuple(dict.fromkeys(u for u in pair.users if u))[:MAX_USERS],
            host=pair.host,
        )

    def prune(self, now: datetime | None = None) -> int:
        """Forget pairs with no failure inside the window before `now` (default: the newest
        record time seen). Safe at any time: such a pair would start afresh anyway."""
        now = now or self._latest
        if now is None:
            return 0
        stale = [key for key, pair in self._pairs.items() if now - pair.times[-1] >= self._span]
        for key in stale:
            del self._pairs[key]
        return len(stale)

    def reset(self, device: str | None = None, client: str | None = None) -> int:
        """Forget the pairs matching `device` and/or `client` (all when both are None)."""
        doomed = [
            key
            for key in self._pairs
            if (device is None or key[0] == device) and (client is None or key[1] == client)
        ]
        for key in doomed:
            del self._pairs[key]
        return len(doomed)

    def top(self, limit: int = 10) -> list[dict[str, Any]]:
        """The pairs with the most failures in their window, most first."""
        ranked = sorted(self._pairs.items(), key=lambda item: len(item[1].times), reverse=True)
        return [
            {
                "device": device,
                "client": client,
                "count": len(pair.times),
                "last_seen": timestamp(pair.times[-1]),
                "alerted": pair.last_alert is not None,
            }
            for (device, client), pair in ranked[:limit]
        ]
