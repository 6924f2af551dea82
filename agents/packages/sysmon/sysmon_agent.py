"""sysmon: every SYSMON_INTERVAL seconds, this host's load, memory and disk.

Each sample is a JSON line on stdout (as before the SDK: the agent's log file is its record)
and becomes the agent's metrics, published on `{prefix}.{agent_id}.metrics` with every heartbeat.
The SDK brings heartbeats, commands (`sample` is added here) and the clean SIGTERM exit.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from opmas_agent import Agent, command, run, timestamp


def meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def sample(agent_id: str) -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    mem = meminfo()
    disk = shutil.disk_usage("/")
    return {
        "time": timestamp(),
        "agent_id": agent_id,
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "memory_total": mem.get("MemTotal", 0),
        "memory_available": mem.get("MemAvailable", 0),
        "disk_total": disk.total,
        "disk_free": disk.free,
    }


def as_metrics(values: dict[str, Any]) -> dict[str, float]:
    """A sample as flat numbers, the shape of `{prefix}.{agent_id}.metrics`."""
    load1, load5, load15 = values["load"]
    return {
        "load1": load1,
        "load5": load5,
        "load15": load15,
        "memory_total_bytes": values["memory_total"],
        "memory_available_bytes": values["memory_available"],
        "disk_total_bytes": values["disk_total"],
        "disk_free_bytes": values["disk_free"],
    }


def positive(text: str) -> float:
    value = float(text.strip().removesuffix("s"))
    if not value > 0:
        raise ValueError("must be positive")
    return value


class Sysmon(Agent):
    default_id = "sysmon"

    async def setup(self) -> None:
        self.interval = self.setting("SYSMON_INTERVAL", 30.0, positive)
        self.last: dict[str, Any] = {}

    async def run(self) -> None:
        while True:
            self.take_sample()
            if await self.sleep(self.interval):
                return

    def take_sample(self) -> dict[str, Any]:
        self.last = sample(self.agent_id)
        print(json.dumps(self.last), flush=True)
        self.metrics.update(as_metrics(self.last))
        return self.last

    @command("sample")
    def sample_now(self, params: dict[str, Any]) -> dict[str, Any]:
        """Take a sample now and return it."""
        return self.take_sample()


if __name__ == "__main__":
    run(Sysmon)
