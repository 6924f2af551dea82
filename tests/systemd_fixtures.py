"""pytest fixtures around the systemd sandbox (tests/systemd_sandbox.py).

- `systemd_sandbox`: one booted SystemdSandbox for the whole session, powered off at its end.
  Skipped only when not root (DESIGN §9); a missing program or a boot that fails fails the test
  with the reason and the sandbox's output.

A conftest exposes it by importing it (`from systemd_fixtures import systemd_sandbox`):
tests/integration/conftest.py does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# tests/ is on sys.path while its conftest is imported (rootdir-relative, no __init__.py here).
from systemd_sandbox import SandboxError, SandboxUnavailable, SystemdSandbox


@pytest.fixture(scope="session")
def systemd_sandbox() -> Iterator[SystemdSandbox]:
    sandbox = SystemdSandbox()
    skipped = failed = ""
    try:
        sandbox.start()
    except SandboxUnavailable as exc:
        skipped = str(exc)
    except SandboxError as exc:
        failed = str(exc)
    # Outside the except blocks, so that the report is the message alone, without a chained traceback.
    if skipped:
        pytest.skip(skipped)
    if failed:
        pytest.fail(f"systemd sandbox unavailable: {failed}", pytrace=False)
    try:
        yield sandbox
    finally:
        sandbox.stop()
