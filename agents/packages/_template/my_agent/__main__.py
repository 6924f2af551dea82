"""`python -m my_agent`: the manifest's entrypoint."""

from __future__ import annotations

from opmas_agent import run

from .agent import MyAgent

run(MyAgent)
