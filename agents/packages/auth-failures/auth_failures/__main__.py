"""`python -m auth_failures`: what opmasd runs (entrypoint {module: auth_failures})."""

from __future__ import annotations

from opmas_agent import run

from .agent import AuthFailuresAgent

run(AuthFailuresAgent)
