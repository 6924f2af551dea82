"""Fixtures for every test directory (unit, integration, e2e).

- Every test: XDG_CONFIG_HOME in a temporary folder and no OPMAS_TOKEN (opmasctl reads both).
- `private_pg`: a started PrivateCluster (tests/pgcluster.py), a PostgreSQL server of the test's
  own that it may stop, freeze, thaw, SIGKILL and start again -- never the machine's shared one.
  Closed (thawed, stopped, removed) after the test, whatever its outcome.
- `systemd_sandbox`: one systemd booted in namespaces of its own for the session
  (tests/systemd_fixtures.py), for the systemd runtime's integration and e2e tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# tests/ is on sys.path while its conftest is imported (rootdir-relative, no __init__.py here).
from pgcluster import PgUnavailable, PrivateCluster
from systemd_fixtures import systemd_sandbox

__all__ = ["systemd_sandbox"]


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


@pytest.fixture(autouse=True)
def _no_users_opmasctl_file(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """opmasctl reads the user's ~/.config/opmas/opmasctl.yaml (server, token): never the real
    one of whoever runs the tests, in-process or in the processes the tests start."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.delenv("OPMAS_TOKEN", raising=False)
