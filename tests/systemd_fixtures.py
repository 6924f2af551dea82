"""pytest fixtures around the systemd sandbox (tests/systemd_sandbox.py).

- `systemd_sandbox`: one booted SystemdSandbox for the whole session, powered off at its end.
  Skipped only when not root (DESIGN §9); a missing program or a boot that fails fails the test
  with the reason and the sandbox's output.
- `booted(SystemdSandbox(...))`: the same for a sandbox with options of its own (a module's
  fixture: tests/e2e/test_opmasd_unit.py boots one that runs opmasd itself as a unit).

A conftest exposes it by importing it (`from systemd_fixtures import systemd_sandbox`):
tests/integration/conftest.py does.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ is on sys.path while its conftest is imported (rootdir-relative, no __init__.py here).
from systemd_sandbox import SandboxError, SandboxUnavailable, SystemdSandbox


@contextlib.contextmanager
def booted(sandbox: SystemdSandbox) -> Iterator[SystemdSandbox]:
    """Start sandbox (skip when not root, fail with the reason when it cannot boot); stop it after."""
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


# This checkout and the Python running the tests: tests run them inside the sandbox too (opmasd
# as a unit, a scope placement), and a clean clone may live under /tmp, which is the sandbox's own.
CHECKOUT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


@pytest.fixture(scope="session")
def systemd_sandbox() -> Iterator[SystemdSandbox]:
    with booted(SystemdSandbox(shared=(CHECKOUT, VENV))) as sandbox:
        yield sandbox


def until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """check()'s first truthy value, asked every 0.1 s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)
