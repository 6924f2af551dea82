"""opmasctl's output as scripts and people see it: -o json and -o yaml are exactly the REST
API's documents, and tables on a terminal fit its width and colour the state."""

from __future__ import annotations

import os
import pty
import re
import struct
import subprocess
from collections.abc import Iterator
from fcntl import ioctl
from termios import TIOCSWINSZ
from typing import Any

import pytest
import yaml

from .harness import OPMASCTL, Sandbox, create, sleeper, spawn, status, wait_state
from .rest_client import Rest, rest_of, rest_sandbox

pytestmark = pytest.mark.timeout(60)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with rest_sandbox("opmasctl-output") as b:
        yield b


@pytest.fixture(scope="module")
def rest(box: Sandbox) -> Iterator[Rest]:
    client = rest_of(box)
    yield client
    client.close()


def document(box: Sandbox, fmt: str, *args: str) -> Any:
    result = box.opmasctl(*args, "-o", fmt)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)  # JSON is YAML too


def test_json_and_yaml_are_the_rest_apis_documents(box: Sandbox, rest: Rest) -> None:
    """One vocabulary: a script can switch between curl and opmasctl (stopped agents, so that
    nothing moves between the two reads)."""
    create(
        box.stub, "same-a", sleeper(), type="same-json", description="one vocabulary", environment={"K": "v"}
    )
    create(box.stub, "same-b", sleeper(), type="same-json")
    for args, path in (
        (("agents", "get", "same-a"), "/api/v1/agents/same-a"),
        (("agents", "status", "same-a"), "/api/v1/agents/same-a/status"),
        (("agents", "list", "--type", "same-json"), "/api/v1/agents?type=same-json"),
        (
            ("agents", "list", "--type", "same-json", "--state", "stopped"),
            "/api/v1/agents?type=same-json&state=4",
        ),
    ):
        reply = rest.get(path)
        assert reply.status == 200, reply.body
        for fmt in ("json", "yaml"):
            assert document(box, fmt, *args) == reply.json(), (args, fmt)
    # Changes answer with the API's reply too.
    started = document(box, "json", "agents", "start", "same-b")
    assert started["changed"] is True and started["status"]["agentId"] == "same-b"
    assert started["status"]["state"] in ("AGENT_STATE_STARTING", "AGENT_STATE_RUNNING")
    stopped = document(box, "json", "agents", "stop", "same-b")
    assert sorted(stopped) == sorted(rest.post("/api/v1/agents/same-b/stop").json())
    deleted = document(box, "json", "agents", "delete", "same-a")
    assert deleted == {"agentId": "same-a", "deleted": True, "message": deleted["message"]}


def on_terminal(box: Sandbox, *args: str, columns: int, env: dict[str, str] | None = None) -> str:
    """opmasctl's stdout when it is a terminal `columns` wide (a pty; no $COLUMNS to go by)."""
    master, slave = pty.openpty()
    ioctl(slave, TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    client_env = box.client_env({"TERM": "xterm", **(env or {})})
    for name in ("COLUMNS", "LINES", *(() if env and "NO_COLOR" in env else ("NO_COLOR",))):
        client_env.pop(name, None)
    process = spawn(
        [*OPMASCTL, "--server", str(box.socket), *args],
        env=client_env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    out = b""
    try:
        while chunk := os.read(master, 65536):
            out += chunk
    except OSError:  # EIO: the terminal's other side is closed
        pass
    finally:
        os.close(master)
    assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
    return out.decode().replace("\r\n", "\n")


def test_tables_fit_the_terminal_and_colour_the_state(box: Sandbox) -> None:
    agent_id = "tty-agent-with-a-long-id"
    create(box.stub, agent_id, sleeper(), start=True, type="tty")
    wait_state(box.stub, agent_id, 2)  # AGENT_STATE_RUNNING
    try:
        fitted = on_terminal(box, "agents", "list", "-o", "wide", "--type", "tty", columns=130)
        header, row = fitted.splitlines()
        assert all(len(ANSI.sub("", line)) <= 130 for line in (header, row)), fitted
        assert ANSI.sub("", row).startswith(f"{agent_id}  ")  # the id is never cut
        assert "…" in row
        assert "\x1b[32mrunning\x1b[0m" in row  # the STATE cell, green
        assert "\x1b[" not in header

        for env in ({"NO_COLOR": "1"}, {"TERM": "dumb"}):
            plain = on_terminal(box, "agents", "list", "--type", "tty", columns=200, env=env)
            assert "\x1b[" not in plain and " running " in plain, env

        # Piped: the whole row, no colour.
        piped = box.opmasctl("agents", "list", "-o", "wide", "--type", "tty")
        assert "…" not in piped.stdout and "\x1b[" not in piped.stdout
        assert len(piped.stdout.splitlines()[1]) > 130
        assert status(box.stub, agent_id).pid > 0
    finally:
        box.opmasctl("agents", "delete", agent_id)
