"""Fixtures for every test directory (unit, integration, e2e).

- `private_pg`: a started PrivateCluster (tests/pgcluster.py), a PostgreSQL server of the test's
  own that it may stop, freeze, thaw, SIGKILL and start again -- never the machine's shared one.
  Closed (thawed, stopped, removed) after the test, whatever its outcome.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# tests/ is on sys.path while its conftest is imported (rootdir-relative, no __init__.py here).
from pgcluster import PgUnavailable, PrivateCluster


@pytest.fixture
def private_pg(request: pytest.FixtureRequest) -> Iterator[PrivateCluster]:
    missing = ""
    try:
        cluster = PrivateCluster(name=_short(request.node.name))
    except PgUnavailable as exc:
        missing = str(exc)
    if missing:
        # Fail, not skip: a fault test that cannot run must not pass unnoticed. Outside the
        # except block, so that the report is the message alone, without a chained traceback.
        pytest.fail(f"private PostgreSQL cluster unavailable: {missing}", pytrace=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _short(name: str) -> str:
    """A directory-name prefix from the test's name (the unix socket path must stay < 108 bytes)."""
    return "".join(c if c.isalnum() else "-" for c in name)[:24]
