"""Whether systemd is stopping opmasd in order to start it again (`systemctl restart`, the
try-restart of a package upgrade): then the agents stay up for the next opmasd to adopt.

`service.stop_agents_on_shutdown` (the default) stops the agents when opmasd stops. A restart
is not a stop an operator means for the agents: `systemctl restart opmasd` must keep every agent
running, and only `systemctl stop` stop them. opmasd cannot tell the two apart from its SIGTERM,
but systemd can: while it stops the unit for a restart, the unit's pending job is of type
`restart` (it becomes `start` only once the stop is over). So at a shutdown that would stop the
agents, opmasd asks the systemd manager that runs it (the system bus as root, the user bus
otherwise) for its unit's job, bounded in time. When systemd does not answer (its bus is down)
the agents are left running: of the systemd runtime's, none could be stopped anyway, and a
restart that stopped agents (the mistake it cannot rule out) costs more than a stop that left
them for the next opmasd to adopt or an operator to stop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import structlog
from dbus_fast import Variant

from opmasd.runtime.systemd_dbus import PROPERTIES, SYSTEMD, UNIT, SystemdError, SystemdManager

log = structlog.get_logger(__name__)

JOB = "org.freedesktop.systemd1.Job"
# The job types of a stop that is followed by a start (try-restart becomes restart on an active
# unit; reload-or-restart of a unit without ExecReload too, but opmasd has one).
RESTART_JOBS = frozenset({"restart", "try-restart"})


class _JobQuery(SystemdManager):
    async def job_type_of_pid(self, pid: int) -> str:
        """The type of the job pending on the unit that holds `pid`; "" when there is none."""
        unit = await self._manager("GetUnitByPID", "u", [pid])
        job = await self._call(SYSTEMD, str(unit[0]), PROPERTIES, "Get", "ss", [UNIT, "Job"])
        _, job_path = _value(job[0])
        if str(job_path) == "/":
            return ""
        kind = await self._call(SYSTEMD, str(job_path), PROPERTIES, "Get", "ss", [JOB, "JobType"])
        return str(_value(kind[0]))


def _value(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


async def restart_pending(
    environ: Mapping[str, str] | None = None, bus: str | None = None, timeout: float = 2.0
) -> bool | None:
    """True when systemd is restarting the unit opmasd runs in; False when it stops it, or when
    opmasd was not started by systemd (no INVOCATION_ID); None when systemd does not answer."""
    env = os.environ if environ is None else environ
    if not env.get("INVOCATION_ID"):
        return False
    where = bus or ("system" if os.geteuid() == 0 else "user")
    query = _JobQuery(timeout)
    try:
        async with asyncio.timeout(timeout * 2):  # the connection and three calls, all told
            await query.connect(where)
            kind = await query.job_type_of_pid(os.getpid())
    except (SystemdError, OSError, TimeoutError) as exc:
        log.warning(
            "cannot tell a restart from a stop (systemd does not answer): agents left running", error=str(exc)
        )
        return None
    finally:
        await query.close()
    if kind in RESTART_JOBS:
        log.info("systemd restarts opmasd: agents keep running for the next opmasd to adopt", job=kind)
        return True
    return False
