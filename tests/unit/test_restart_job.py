"""Whether opmasd's stop is part of a systemd restart: the answers that need no systemd."""

from __future__ import annotations

import time

from opmasd.systemd.restart_job import restart_pending


async def test_not_started_by_systemd_is_no_restart() -> None:
    assert await restart_pending(environ={}) is False


async def test_a_systemd_that_does_not_answer_is_unknown_within_the_bound(tmp_path: object) -> None:
    # Unknown, not "no restart": the shutdown then leaves agents running instead of stopping
    # those of one runtime only (systemd-runtime units cannot be stopped without the bus).
    began = time.monotonic()
    answer = await restart_pending(
        environ={"INVOCATION_ID": "1" * 32}, bus="unix:path=/nonexistent/bus", timeout=0.5
    )
    assert answer is None
    assert time.monotonic() - began < 2.0
