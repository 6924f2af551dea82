"""Fixtures of the integration tests: the booted systemd (see tests/systemd_fixtures.py)."""

from __future__ import annotations

from systemd_fixtures import systemd_sandbox

__all__ = ["systemd_sandbox"]
