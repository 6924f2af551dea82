"""The restart policy: whether an exited agent is started again, and after how long.

Pure functions over plain values, so the policy is unit-tested without processes or clocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from opmasd.core.model import ExitInfo, RestartPolicy


@dataclass(frozen=True)
class RestartSettings:
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # Running this long counts as a success: the count of consecutive failures starts over.
    stable_after: float = 10.0
    # Consecutive restarts allowed before the agent is put in `error` (a crash loop).
    max_restarts: int = 5


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay: float
    # Consecutive failures including this exit (what the record keeps).
    failures: int
    reason: str


def wants_restart(policy: RestartPolicy, exit_info: ExitInfo, failed_start: bool = False) -> bool:
    """failed_start: it ended within its start window, which is a failure whatever its code."""
    if policy is RestartPolicy.ALWAYS:
        return True
    if policy is RestartPolicy.ON_FAILURE:
        return failed_start or not exit_info.success
    return False


def backoff_delay(failures: int, settings: RestartSettings) -> float:
    """0 for the first restart (a one-off crash costs no downtime), then doubling to the cap."""
    if failures <= 1:
        return 0.0
    return float(min(settings.backoff_max, settings.backoff_initial * 2 ** (failures - 2)))


def decide(
    policy: RestartPolicy,
    exit_info: ExitInfo,
    previous_failures: int,
    ran_for: float | None,
    settings: RestartSettings,
    failed_start: bool = False,
) -> RestartDecision:
    """What to do after an unexpected exit.

    previous_failures: consecutive failures before this exit. ran_for: how long the process
    ran (None when unknown), compared with the stability window. failed_start: it ended
    before it counted as started (spec.start_seconds).
    """
    if ran_for is not None and ran_for >= settings.stable_after:
        previous_failures = 0
    failures = previous_failures + 1
    how = exit_info.reason
    if failed_start:
        lasted = "" if ran_for is None else f" after {ran_for:.3g}s"
        how = f"failed to start: {how}{lasted}"
    if not wants_restart(policy, exit_info, failed_start):
        return RestartDecision(False, 0.0, failures, f"{how}; restart policy {policy.value}")
    if failures > settings.max_restarts:
        return RestartDecision(
            False,
            0.0,
            failures,
            f"{how}; crash loop: gave up after {settings.max_restarts} restarts "
            f"without running {settings.stable_after:g}s",
        )
    delay = backoff_delay(failures, settings)
    when = "now" if delay == 0 else f"in {delay:g}s"
    return RestartDecision(True, delay, failures, f"{how}; restart {failures}/{settings.max_restarts} {when}")
