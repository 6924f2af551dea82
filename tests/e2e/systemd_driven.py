"""opmasd on the host driving the test systemd's units: its environment, and agents cleaned up."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from systemd_sandbox import SystemdSandbox

from .harness import Sandbox


def systemd_env(systemd_sandbox: SystemdSandbox) -> dict[str, str]:
    """The variables that point opmasd's systemd runtime at the sandbox's bus, files and journal."""
    root = f"/proc/{systemd_sandbox.pid}/root"
    return {
        "OPMAS_AGENTS_SYSTEMD": "required",
        "OPMAS_AGENTS_SYSTEMD_BUS": systemd_sandbox.bus_address,
        "OPMAS_AGENTS_SYSTEMD_ROOT": root,
        "OPMAS_AGENTS_SYSTEMD_JOURNAL": f"{root}/run/log/journal",
    }


def delete_all(box: Sandbox) -> None:
    """Units outlive opmasd: delete its agents, so that none is left behind."""
    listed = json.loads(box.opmasctl("-o", "json", "agents", "list").stdout or "{}")
    for found in listed.get("agents", []):
        box.opmasctl("agents", "delete", found["agentId"])


def driven_box(make_sandbox: Callable[..., Sandbox], systemd_sandbox: SystemdSandbox) -> Iterator[Sandbox]:
    """A started sandbox whose opmasd runs agents as the test systemd's units (a fixture's body)."""
    box = make_sandbox(env=systemd_env(systemd_sandbox))
    box.start()
    yield box
    delete_all(box)
