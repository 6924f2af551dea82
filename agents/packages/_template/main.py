"""A minimal long-running agent: prints a line per interval, exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print(f"{os.environ.get('AGENT_ID', 'my-agent')} started", flush=True)
while not stop.wait(float(os.environ.get("INTERVAL", "30"))):
    print("still here", flush=True)
print("stopping", flush=True)
