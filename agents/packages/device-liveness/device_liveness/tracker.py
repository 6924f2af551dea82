"""Device liveness: which devices have gone quiet, and which have come back.

Silence is judged by when records *arrive* (the `now` the caller passes), not by the time
written in them: the question is whether the device talks to us now, device clocks drift or
are simply wrong, and a replay of old logs must not make every device look silent. The
record's own time is kept alongside, for the operator.

Pure logic: the caller supplies every `now` (seconds, e.g. `time.time()`), so tests run on an
injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opmas_agent import timestamp

SILENT = "device_silent"
RECOVERED = "device_recovered"


def _rfc3339(epoch: float) -> str:
    return timestamp(datetime.fromtimestamp(epoch, UTC))


@dataclass(frozen=True)
class LivenessFinding:
    """A device went silent (`device_silent`) or talked again after being silent (`device_recovered`)."""

    finding: str
    device: str
    last_seen: float  # when we last heard from it (for recovered: when it talked again)
    silent_seconds: float
    timeout_seconds: float
    host: str = ""
    last_record_time: str = ""

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "finding": self.finding,
            "severity": "medium" if self.finding == SILENT else "info",
            "device": self.device,
            "last_seen": _rfc3339(self.last_seen),
            "silent_seconds": round(self.silent_seconds, 3),
            "timeout_seconds": self.timeout_seconds,
        }
        if self.host:
            body["host"] = self.host
        if self.last_record_time:
            body["last_record_time"] = self.last_record_time
        return body


@dataclass
class _Device:
    last_seen: float
    host: str = ""
    last_record_time: str = ""
    silent: bool = False
    records: int = 0


class LivenessTracker:
    """Marks a device silent once, after `timeout` seconds without a record; recovered once it talks.

    Args:
        timeout: seconds of silence after which a device is reported.
    """

    def __init__(self, timeout: float = 300.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self._devices: dict[str, _Device] = {}

    @property
    def tracked(self) -> int:
        return len(self._devices)

    @property
    def silent(self) -> int:
        return sum(1 for d in self._devices.values() if d.silent)

    def expect(self, device: str, now: float) -> None:
        """Track a device not heard from yet (a configured inventory): its silence counts from now."""
        self._devices.setdefault(device, _Device(last_seen=now))

    def seen(
        self, device: str, now: float, *, host: str = "", record_time: str = ""
    ) -> LivenessFinding | None:
        """A record from `device` arrived at `now`; `device_recovered` if it had been reported silent."""
        state = self._devices.get(device)
        if state is None:
            state = self._devices[device] = _Device(last_seen=now)
        finding = None
        if state.silent:
            finding = LivenessFinding(
                finding=RECOVERED,
                device=device,
                last_seen=now,
                silent_seconds=max(0.0, now - state.last_seen),
                timeout_seconds=self.timeout,
                host=host or state.host,
                last_record_time=record_time,
            )
            state.silent = False
        state.last_seen = max(state.last_seen, now)
        state.records += 1
        if host:
            state.host = host
        if record_time:
            state.last_record_time = record_time
        return finding

    def check(self, now: float) -> list[LivenessFinding]:
        """`device_silent` for each device silent longer than the timeout and not yet reported."""
        findings = []
        for device, state in self._devices.items():
            quiet = now - state.last_seen
            if not state.silent and quiet > self.timeout:
                state.silent = True
                findings.append(
                    LivenessFinding(
                        finding=SILENT,
                        device=device,
                        last_seen=state.last_seen,
                        silent_seconds=quiet,
                        timeout_seconds=self.timeout,
                        host=state.host,
                        last_record_time=state.last_record_time,
                    )
                )
        return findings

    def forget(self, device: str) -> bool:
        """Stop tracking a device (decommissioned); False if it was not tracked."""
        return self._devices.pop(device, None) is not None

    def devices(self, now: float) -> list[dict[str, Any]]:
        """Every tracked device with its state, the quietest first."""
        return [
            {
                "device": device,
                "host": state.host,
                "state": "silent" if state.silent else "alive",
                "last_seen": _rfc3339(state.last_seen),
                "quiet_seconds": round(max(0.0, now - state.last_seen), 3),
                "last_record_time": state.last_record_time or None,
                "records": state.records,
            }
            for device, state in sorted(self._devices.items(), key=lambda item: item[1].last_seen)
        ]
