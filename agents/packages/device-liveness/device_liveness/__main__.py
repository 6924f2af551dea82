"""`python -m device_liveness`: what opmasd runs (entrypoint {module: device_liveness})."""

from __future__ import annotations

from opmas_agent import run

from .agent import DeviceLivenessAgent

run(DeviceLivenessAgent)
