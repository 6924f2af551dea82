"""The auth-failures agent: device log events in (`logs.>`), brute-force findings out (`findings.auth`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from opmas_agent import Agent, CommandError, ConfigError, command, timestamp

from .detector import AuthFailureDetector

PRUNE_EVERY = 30.0  # seconds between sweeps of pairs whose window has emptied


def positive(text: str) -> float:
    value = float(text.strip().removesuffix("s"))
    if not value > 0:
        raise ValueError("must be positive")
    return value


class AuthFailuresAgent(Agent):
    """Counts authentication failures per (device, client); publishes a finding at the threshold.

    Environment: AUTH_FAIL_THRESHOLD (5), AUTH_FAIL_WINDOW seconds (60), LOG_SUBJECT (logs.>),
    FINDINGS_SUBJECT (findings.auth).
    """

    default_id = "auth-failures"

    async def setup(self) -> None:
        threshold = self.setting("AUTH_FAIL_THRESHOLD", 5)
        if threshold < 1:
            raise ConfigError(f"AUTH_FAIL_THRESHOLD={threshold}: must be at least 1")
        window = self.setting("AUTH_FAIL_WINDOW", 60.0, positive)
        self.findings_subject = self.setting("FINDINGS_SUBJECT", "findings.auth")
        self.detector = AuthFailureDetector(threshold, window)
        self._update_metrics()
        await self.subscribe(self.setting("LOG_SUBJECT", "logs.>"), self.on_record)

    async def on_record(self, subject: str, record: dict[str, Any]) -> None:
        undated = self.detector.stats.bad_timestamp
        finding = self.detector.observe(record, received_at=datetime.now(UTC))
        if self.detector.stats.bad_timestamp > undated:
            self.throttled_warning(
                "auth failure without a usable timestamp: arrival time used",
                subject=subject,
                timestamp=repr(record.get("timestamp")),
            )
        if finding is not None:
            payload = {**finding.payload(), "agent_id": self.agent_id, "timestamp": timestamp()}
            self.log.warning(
                "authentication failures over threshold",
                device=finding.device,
                client=finding.client,
                count=finding.count,
            )
            await self.publish(self.findings_subject, payload)
        self._update_metrics()

    async def run(self) -> None:
        while not await self.sleep(PRUNE_EVERY):
            self.detector.prune()
            self._update_metrics()

    def _update_metrics(self) -> None:
        stats = self.detector.stats
        self.metrics.update(
            records_seen=stats.records,
            auth_failures_seen=stats.auth_failures,
            findings_published=stats.findings,
            pairs_tracked=self.detector.tracked,
            records_ignored=stats.ignored,
            records_bad_timestamp=stats.bad_timestamp,
        )

    @command
    def reset(self, params: dict[str, Any]) -> dict[str, int]:
        """Forget counts: all, or those of params `device` and/or `client`."""
        device, client = params.get("device"), params.get("client")
        for name, value in (("device", device), ("client", client)):
            if value is not None and not isinstance(value, str):
                raise CommandError(f"{name} must be a string")
        cleared = self.detector.reset(device, client)
        self._update_metrics()
        self.log.info("counts reset", device=device, client=client, cleared=cleared)
        return {"cleared": cleared}

    @command
    def stats(self, params: dict[str, Any]) -> dict[str, Any]:
        """Counters, settings, and the pairs with the most failures (params `limit`, default 10)."""
        limit = params.get("limit", 10)
        if not isinstance(limit, int) or limit < 0:
            limit = 10
        stats = self.detector.stats
        return {
            "threshold": self.detector.threshold,
            "window_seconds": self.detector.window,
            "records": stats.records,
            "auth_failures": stats.auth_failures,
            "findings": stats.findings,
            "ignored": stats.ignored,
            "bad_timestamp": stats.bad_timestamp,
            "pairs_tracked": self.detector.tracked,
            "top": self.detector.top(limit),
        }
