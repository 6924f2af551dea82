"""sysmon: every SYSMON_INTERVAL seconds, one JSON line with the host's load, memory and disk.

Stops cleanly on SIGTERM (finishes the current line, exits 0), so opmasd never has to kill it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from datetime import UTC, datetime

stop = threading.Event()


def meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def sample() -> dict[str, object]:
    load1, load5, load15 = os.getloadavg()
    mem = meminfo()
    disk = shutil.disk_usage("/")
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "agent_id": os.environ.get("AGENT_ID", "sysmon"),
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "memory_total": mem.get("MemTotal", 0),
        "memory_available": mem.get("MemAvailable", 0),
        "disk_total": disk.total,
        "disk_free": disk.free,
    }


def main() -> int:
    interval = float(os.environ.get("SYSMON_INTERVAL", "30"))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"event": "started", "interval": interval}), flush=True)
    while not stop.is_set():
        print(json.dumps(sample()), flush=True)
        stop.wait(interval)
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
