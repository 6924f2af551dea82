"""Fixtures of the end-to-end tests: sandboxes running real opmasd processes (see harness.py).

- `make_sandbox(name, backend=..., env=...)`: a fresh sandbox for this test, torn down (daemon
  stopped, leftovers killed and reported as a failure, directories and schema removed) after it.
- `backend`: "sqlite" or "postgres", for the tests that must pass on both stores.
- Module-scoped sandboxes are made in the test modules with `harness.sandbox(...)`.

When a test fails, the tail of every live sandbox's opmasd stderr is added to its report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .harness import ACTIVE_SANDBOXES, Sandbox, reap_orphans, sandbox, set_subreaper

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="package", autouse=True)
def _subreaper() -> Iterator[None]:
    """This test process adopts the orphans of the daemons (see harness.set_subreaper) while
    the e2e tests run, and reaps them."""
    set_subreaper(True)
    yield
    set_subreaper(False)
    reap_orphans()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_sandbox(request: pytest.FixtureRequest) -> Iterator[Callable[..., Sandbox]]:
    with contextlib.ExitStack() as stack:

        def make(name: str = "", backend: str = "sqlite", env: dict[str, str] | None = None) -> Sandbox:
            return stack.enter_context(sandbox(name or request.node.name, backend, env))

        yield make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for box in list(ACTIVE_SANDBOXES):
            report.sections.append((f"opmasd stderr ({box.name})", box.stderr_report()))
