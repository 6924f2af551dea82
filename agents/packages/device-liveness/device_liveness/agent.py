"""The device-liveness agent: device logs in (`logs.>`), silent/recovered findings out."""

from __future__ import annotations

from typing import Any

from opmas_agent import Agent, CommandError, command, timestamp

from .tracker import LivenessFinding, LivenessTracker


def positive(text: str) -> float:
    value = float(text.strip().removesuffix("s"))
    if not value > 0:
        raise ValueError("must be positive")
    return value


class DeviceLivenessAgent(Agent):
    """Reports devices that stop sending logs, and their return.

    Environment: LIVENESS_TIMEOUT seconds (300), LIVENESS_CHECK_INTERVAL seconds (10),
    LIVENESS_DEVICES (comma-separated devices expected even before their first record),
    LOG_SUBJECT (logs.>), FINDINGS_SUBJECT (findings.liveness).
    """

    default_id = "device-liveness"

    async def setup(self) -> None:
        self.tracker = LivenessTracker(self.setting("LIVENESS_TIMEOUT", 300.0, positive))
        self.check_interval = self.setting("LIVENESS_CHECK_INTERVAL", 10.0, positive)
        self.findings_subject = self.setting("FINDINGS_SUBJECT", "findings.liveness")
        expected = self.setting("LIVENESS_DEVICES", "")
        now = self.clock()
        for device in filter(None, (d.strip() for d in expected.split(","))):
            self.tracker.expect(device, now)
        self.records = 0
        self._update_metrics()
        await self.subscribe(self.setting("LOG_SUBJECT", "logs.>"), self.on_record)

    async def on_record(self, subject: str, record: dict[str, Any]) -> None:
        device = record.get("device")
        if not isinstance(device, str) or not device:
            return
        self.records += 1
        host, when = record.get("host"), record.get("timestamp")
        finding = self.tracker.seen(
            device,
            self.clock(),
            host=host if isinstance(host, str) else "",
            record_time=when if isinstance(when, str) else "",
        )
        if finding is not None:
            await self._report(finding)
        self._update_metrics()

    async def run(self) -> None:
        while not await self.sleep(self.check_interval):
            await self.check_now()

    async def check_now(self) -> list[LivenessFinding]:
        """Report the devices that have just crossed the timeout (the run loop calls this)."""
        findings = self.tracker.check(self.clock())
        for finding in findings:
            await self._report(finding)
        self._update_metrics()
        return findings

    async def _report(self, finding: LivenessFinding) -> None:
        self.log.info(finding.finding, device=finding.device, silent_seconds=round(finding.silent_seconds, 1))
        payload = {**finding.payload(), "agent_id": self.agent_id, "timestamp": timestamp()}
        await self.publish(self.findings_subject, payload)

    def _update_metrics(self) -> None:
        self.metrics.update(
            records_seen=self.records,
            devices_tracked=self.tracker.tracked,
            devices_silent=self.tracker.silent,
        )

    @command
    def devices(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every tracked device with its state, the quietest first."""
        return self.tracker.devices(self.clock())

    @command
    def forget(self, params: dict[str, Any]) -> dict[str, Any]:
        """Stop tracking params `device` (e.g. a decommissioned one)."""
        device = params.get("device")
        if not isinstance(device, str) or not device:
            raise CommandError("params.device: required")
        if not self.tracker.forget(device):
            raise CommandError(f"device {device!r} is not tracked")
        self._update_metrics()
        return {"forgotten": device}
