"""An agent runs as the user and group its spec names (issue 12), under the process runtime;
tests/e2e/test_systemd_runtime.py checks the systemd runtime. An unknown user is refused."""

from __future__ import annotations

import grp
import json
import pwd
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Sandbox, sleeper

pytestmark = pytest.mark.timeout(120)


def ids_of(pid: int) -> tuple[int, int]:
    """(uid, gid) of a process, from /proc/PID/status (real ids)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def running_pid(box: Sandbox, agent_id: str) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        agent = json.loads(box.opmasctl("-o", "json", "agents", "get", agent_id).stdout)
        if agent["status"]["state"] == "AGENT_STATE_RUNNING":
            return int(agent["status"]["pid"])
        time.sleep(0.2)
    raise AssertionError(f"{agent_id} is not running: {agent}")


def test_an_agent_runs_as_its_user_and_group(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    nobody, nogroup = pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    done = box.opmasctl(
        "agents", "register", "--name", "as-nobody", "--user", "nobody", "--start", "--", *sleeper()
    )
    assert done.returncode == 0, done.stderr
    assert ids_of(running_pid(box, "as-nobody")) == (nobody.pw_uid, nobody.pw_gid)
    assert (
        json.loads(box.opmasctl("-o", "json", "agents", "get", "as-nobody").stdout)["spec"]["user"]
        == "nobody"
    )
    # A group alone: opmasd's user, that group.
    done = box.opmasctl(
        "agents", "register", "--name", "in-nogroup", "--group", "nogroup", "--start", "--", *sleeper()
    )
    assert done.returncode == 0, done.stderr
    assert ids_of(running_pid(box, "in-nogroup")) == (0, nogroup.gr_gid)
    for agent_id in ("as-nobody", "in-nogroup"):
        box.opmasctl("agents", "delete", agent_id)


def test_an_unknown_user_is_refused_at_registration(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start()
    refused = box.opmasctl(
        "agents", "register", "--name", "ghost", "--user", "no-such-user-x", "--", *sleeper()
    )
    assert refused.returncode == 1
    assert "spec.user: no user 'no-such-user-x' on this host" in refused.stderr, refused.stderr
    # And in a manifest.
    folder = box.package("ghost-pkg", {"name": "ghost", "entrypoint": sleeper(), "group": "no-such-group-x"})
    refused = box.opmasctl("agents", "register", "--manifest", str(folder / "agent.yaml"))
    assert refused.returncode == 1 and "no group 'no-such-group-x' on this host" in refused.stderr, (
        refused.stderr
    )
