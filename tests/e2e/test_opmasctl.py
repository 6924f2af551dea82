"""opmasctl, run as a process against a real opmasd over its unix socket and over TCP."""

from __future__ import annotations

import json
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from opmas.v1 import agents_pb2 as pb

from .harness import (
    OPMASCTL,
    Sandbox,
    create,
    pid_alive,
    python_agent,
    sandbox,
    sleeper,
    spawn,
    status,
    wait_for,
    wait_state,
    write_package,
)

pytestmark = pytest.mark.timeout(60)

TICKER = python_agent(
    """
    import itertools, time
    for n in itertools.count():
        print(f"tick {n}")
        time.sleep(0.1)
    """
)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("opmasctl") as b:
        b.package("pkg-found", {"name": "pkg-found", "type": "cli-test", "entrypoint": sleeper()})
        b.package("pkg-broken", "name: broken\nentrypoint: [oops\n")
        b.start()
        yield b


def ok(box: Sandbox, *args: str, server: str | None = "") -> str:
    result = box.opmasctl(*args, server=server)
    assert result.returncode == 0, f"opmasctl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def as_json(box: Sandbox, *args: str, server: str | None = "") -> Any:
    return json.loads(ok(box, *args, "-o", "json", server=server))


def as_yaml(box: Sandbox, *args: str) -> Any:
    return yaml.safe_load(ok(box, *args, "-o", "yaml"))


def fails(box: Sandbox, *args: str, server: str | None = "") -> subprocess.CompletedProcess[str]:
    result = box.opmasctl(*args, server=server)
    assert result.returncode != 0, f"opmasctl {' '.join(args)} succeeded:\n{result.stdout}"
    return result


# -- reading ------------------------------------------------------------------------------------


def test_list_in_every_format(box: Sandbox) -> None:
    create(box.stub, "cli-list", sleeper(), start=True, type="cli-test")
    try:
        pid = status(box.stub, "cli-list").pid
        table = ok(box, "agents", "list")
        header, *rows = table.splitlines()
        # NAME only in -o wide: by default it is the id again.
        assert header.split() == [
            "ID",
            "TYPE",
            "STATE",
            "DESIRED",
            "PID",
            "UPTIME",
            "RESTARTS",
            "LAST",
            "EXIT",
        ]
        row = next(r.split() for r in rows if r.startswith("cli-list "))
        assert row[:5] == ["cli-list", "cli-test", "running", "running", str(pid)]
        assert any(r.startswith("pkg-found ") and " stopped " in r for r in rows)
        assert "\x1b[" not in table  # piped: no colour

        wide_header, *wide_rows = ok(box, "agents", "list", "-o", "wide", "--type", "cli-test").splitlines()
        assert wide_header.split()[:2] == ["ID", "NAME"] and "LAST HEARTBEAT" in wide_header
        wide_row = next(r for r in wide_rows if r.startswith("cli-list "))
        assert wide_row.split()[1] == "cli-list" and wide_row.endswith(shlex.join(sleeper()))
        assert wide_row[wide_header.index("RUNTIME") :].startswith("process ")
        no_headers = ok(box, "agents", "list", "--no-headers", "--type", "cli-test").splitlines()
        assert sorted(line.split()[0] for line in no_headers) == ["cli-list", "pkg-found"]
        names = ok(box, "agents", "list", "-o", "name", "--type", "cli-test").splitlines()
        assert sorted(names) == ["cli-list", "pkg-found"]

        # -o json is the REST API's ListAgentsResponse, every page in one.
        listed = as_json(box, "agents", "list", "--type", "cli-test")
        assert sorted(listed) == ["agents", "nextPageToken", "totalSize"]
        assert listed["totalSize"] == 2 and listed["nextPageToken"] == ""
        assert sorted(a["agentId"] for a in listed["agents"]) == ["cli-list", "pkg-found"]
        by_id = {a["agentId"]: a for a in listed["agents"]}
        assert by_id["cli-list"]["status"]["pid"] == pid
        assert by_id["cli-list"]["status"]["state"] == "AGENT_STATE_RUNNING"
        assert by_id["cli-list"]["status"]["desiredState"] == "DESIRED_STATE_RUNNING"
        assert by_id["pkg-found"]["source"] == "AGENT_SOURCE_DISCOVERED"

        in_yaml = as_yaml(box, "agents", "list", "--type", "cli-test")
        assert [(a["agentId"], a["spec"]) for a in in_yaml["agents"]] == [
            (a["agentId"], a["spec"]) for a in listed["agents"]
        ]
        running = as_json(box, "agents", "list", "--state", "running", "--type", "cli-test")
        assert [a["agentId"] for a in running["agents"]] == ["cli-list"]
        assert as_json(box, "agents", "list", "--node", "elsewhere") == {
            "agents": [],
            "nextPageToken": "",
            "totalSize": 0,
        }
    finally:
        box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="cli-list"), timeout=10)


def test_get_and_status(box: Sandbox) -> None:
    create(box.stub, "cli-get", sleeper(), start=True, description="shown by get")
    try:
        pid = status(box.stub, "cli-get").pid
        text = ok(box, "agents", "get", "cli-get")
        assert "cli-get" in text and "shown by get" in text and str(pid) in text

        agent = as_json(box, "agents", "get", "cli-get")
        assert agent["spec"]["description"] == "shown by get"
        assert agent["spec"]["command"] == sleeper()
        assert as_yaml(box, "agents", "get", "cli-get")["spec"] == agent["spec"]

        text = ok(box, "agents", "status", "cli-get")
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        assert fields["State"] == "running" and fields["Desired"] == "running"
        assert fields["PID"] == str(pid)
        assert fields["Restarts"] == "0"
        assert "Uptime" in fields and "Last exit" in fields

        one = as_json(box, "agents", "status", "cli-get")
        assert one["pid"] == pid and one["restartCount"] == 0
        assert one["desiredState"] == "DESIRED_STATE_RUNNING"
        assert "uptime" in one

        # Every agent's status: the API's list, as `agents list` gives it.
        everyone = as_json(box, "agents", "status")
        assert "cli-get" in {a["agentId"] for a in everyone["agents"]}
        assert {a["status"]["agentId"] for a in everyone["agents"]} >= {"cli-get"}
        assert "ID" in ok(box, "agents", "status").splitlines()[0]

        metrics = as_json(box, "agents", "metrics", "cli-get")
        assert int(metrics["rssBytes"]) > 0
    finally:
        box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="cli-get"), timeout=10)


def test_status_shows_restarts_and_last_exit(box: Sandbox) -> None:
    create(box.stub, "cli-crash", sleeper(), start=True)
    try:
        pid = status(box.stub, "cli-crash").pid
        os.kill(pid, signal.SIGKILL)
        wait_state(box.stub, "cli-crash", pb.AGENT_STATE_RUNNING, check=lambda s: s.pid not in (0, pid))
        one = as_json(box, "agents", "status", "cli-crash")
        assert one["restartCount"] == 1
        assert one["lastExit"]["signal"] == signal.SIGKILL
        row = next(r for r in ok(box, "agents", "list").splitlines() if r.startswith("cli-crash "))
        assert " 1 " in row and "SIGKILL" in row, row
    finally:
        box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="cli-crash"), timeout=10)


# -- changing -----------------------------------------------------------------------------------


def test_register_start_stop_restart_update_delete(box: Sandbox) -> None:
    out = ok(
        box,
        "agents",
        "register",
        "--name",
        "cli-flags",
        "--type",
        "cli",
        "--env",
        "COLOUR=blue",
        "--stop-timeout",
        "2",
        "--restart-policy",
        "always",
        "--",
        *sleeper(),
    )
    assert "cli-flags registered" in out
    agent = as_json(box, "agents", "get", "cli-flags")
    assert agent["spec"]["command"] == sleeper()
    assert agent["spec"]["environment"] == {"COLOUR": "blue"}
    assert agent["spec"]["restartPolicy"] == "RESTART_POLICY_ALWAYS"
    assert agent["spec"]["stopTimeout"] == "2s"

    out = ok(box, "agents", "start", "cli-flags")
    pid = status(box.stub, "cli-flags").pid
    assert f"started (pid {pid})" in out
    out = ok(box, "agents", "start", "cli-flags")  # idempotent
    assert "already running" in out
    assert status(box.stub, "cli-flags").pid == pid

    restarted = as_json(box, "agents", "restart", "cli-flags")
    assert restarted["changed"] is True
    new_pid = restarted["status"]["pid"]
    assert new_pid not in (0, pid) and not pid_alive(pid)

    out = ok(box, "agents", "update", "cli-flags", "--description", "from the cli", "--env", "COLOUR=red")
    assert "updated" in out and "until restarted" in out
    updated = as_yaml(box, "agents", "get", "cli-flags")
    assert updated["spec"]["description"] == "from the cli"
    assert updated["spec"]["environment"] == {"COLOUR": "red"}
    assert updated["spec"]["type"] == "cli"  # not named, not changed
    # --env adds or overrides one variable and keeps the others; --unset-env removes one;
    # --replace-env makes the given ones the whole environment (kubectl set env's semantics).
    ok(box, "agents", "update", "cli-flags", "--env", "SHAPE=round")
    assert as_json(box, "agents", "get", "cli-flags")["spec"]["environment"] == {
        "COLOUR": "red",
        "SHAPE": "round",
    }
    ok(box, "agents", "update", "cli-flags", "--unset-env", "COLOUR", "--env", "SIZE=9")
    assert as_json(box, "agents", "get", "cli-flags")["spec"]["environment"] == {
        "SHAPE": "round",
        "SIZE": "9",
    }
    ok(box, "agents", "update", "cli-flags", "--replace-env", "--env", "ONLY=1")
    assert as_json(box, "agents", "get", "cli-flags")["spec"]["environment"] == {"ONLY": "1"}
    ok(box, "agents", "update", "cli-flags", "--replace-env")
    assert as_json(box, "agents", "get", "cli-flags")["spec"].get("environment", {}) == {}

    out = ok(box, "agents", "stop", "cli-flags", "--grace", "1")
    assert "cli-flags stopped" in out
    assert not pid_alive(new_pid)
    assert "already stopped" in ok(box, "agents", "stop", "cli-flags")

    assert "cli-flags deleted" in ok(box, "agents", "delete", "cli-flags")
    again = box.opmasctl("agents", "delete", "cli-flags")
    assert again.returncode == 0 and "already deleted" in again.stdout
    assert box.agent_pids("cli-flags") == []


def test_register_from_a_manifest_and_with_command_flag(box: Sandbox) -> None:
    package = write_package(
        box.extra_dir, "cli-manifest", {"name": "cli-manifest", "version": "4.5.6", "entrypoint": sleeper()}
    )
    # A relative path is made absolute by the client (the daemon's working directory is not ours).
    result = subprocess.run(
        [
            *OPMASCTL,
            "--server",
            str(box.socket),
            "agents",
            "register",
            "--manifest",
            "cli-manifest",
            "--start",
        ],
        cwd=box.extra_dir,
        env=box.client_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "registered and started" in result.stdout
    agent = as_json(box, "agents", "get", "cli-manifest")
    assert agent["manifestPath"] == str(package / "agent.yaml")
    assert agent["spec"]["version"] == "4.5.6"
    assert agent["status"]["state"] == "AGENT_STATE_RUNNING"

    registered = as_json(
        box, "agents", "register", "--name", "Cli Command", "--command", "sleep 1000", "--id", "cli-cmd"
    )
    assert registered["agentId"] == "cli-cmd"
    assert registered["spec"]["command"] == ["sleep", "1000"]
    for agent_id in ("cli-manifest", "cli-cmd"):
        ok(box, "agents", "delete", agent_id)


# -- logs ---------------------------------------------------------------------------------------


def test_logs_tail_and_follow(box: Sandbox) -> None:
    create(box.stub, "cli-logs", TICKER, start=True)
    try:
        wait_for(lambda: "tick 3" in ok(box, "agents", "logs", "cli-logs"), what="some output")
        tail = ok(box, "agents", "logs", "cli-logs", "--tail", "2").splitlines()
        assert len(tail) == 2 and all(line.startswith("tick ") for line in tail), tail
        as_lines = as_json(box, "agents", "logs", "cli-logs", "--tail", "1")  # NDJSON: one object
        assert as_lines["agentId"] == "cli-logs" and as_lines["line"].startswith("tick ")

        follower = spawn(
            [*OPMASCTL, "--server", str(box.socket), "agents", "logs", "cli-logs", "--tail", "1", "--follow"],
            env=box.client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = _read_lines(follower, 4, timeout=15)
            numbers = [int(line.split()[1]) for line in lines]
            assert numbers == sorted(numbers) and numbers[-1] > int(tail[-1].split()[1]), lines
        finally:
            follower.send_signal(signal.SIGINT)  # Ctrl-C ends a follow, with the usual 130
            try:
                code = follower.wait(10)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
                raise
        assert code == 130, follower.stderr.read() if follower.stderr else ""
    finally:
        box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="cli-logs"), timeout=10)


def _read_lines(process: subprocess.Popen[str], count: int, timeout: float) -> list[str]:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {lines} within {timeout}s"
        if selector.select(remaining):
            line = process.stdout.readline()
            assert line, f"opmasctl ended early: {process.stderr.read() if process.stderr else ''}"
            lines.append(line.rstrip("\n"))
    return lines


# -- discovery ----------------------------------------------------------------------------------


def test_discover(box: Sandbox) -> None:
    text = ok(box, "agents", "discover")
    assert "pkg-found" in text
    assert "pkg-broken" in text and "invalid YAML" in text
    report = as_json(box, "agents", "discover")
    assert "pkg-found" in {a["agentId"] for a in report["agents"]}
    assert [e["manifestPath"] for e in report["errors"]] == [
        str(box.agents_dir / "pkg-broken" / "agent.yaml")
    ]
    assert as_yaml(box, "agents", "discover") == report


# -- errors -------------------------------------------------------------------------------------


def test_errors_print_the_servers_message_and_exit_non_zero(box: Sandbox) -> None:
    for args in (
        ("agents", "get", "no-such-agent"),
        ("agents", "start", "no-such-agent"),
        ("agents", "status", "no-such-agent"),
        ("agents", "logs", "no-such-agent"),
        ("agents", "delete", "no-such-agent"),
    ):
        result = fails(box, *args)
        assert result.returncode == 3  # not found
        assert "not_found" in result.stderr and "'no-such-agent'" in result.stderr, result.stderr
        assert result.stdout == ""

    result = fails(box, "agents", "register", "--name", "bad", "--id", "Bad Id", "--", *sleeper())
    assert result.returncode == 1
    assert "invalid_argument" in result.stderr
    assert "agent_id" in result.stderr

    result = fails(box, "agents", "register", "--name", "bad", "--", "/no/such/program")
    assert "spec.command" in result.stderr and "/no/such/program" in result.stderr

    result = fails(box, "agents", "get", "x", server=str(box.root / "nobody.sock"))
    assert result.returncode == 4  # unavailable
    assert "cannot reach opmasd" in result.stderr

    usage = fails(box, "agents", "register", "--name", "no-command")
    assert usage.returncode == 2


# -- where the server is ------------------------------------------------------------------------


def test_tcp_server_gives_the_same_answers(box: Sandbox) -> None:
    over_unix = as_json(box, "agents", "list")
    over_tcp = as_json(box, "agents", "list", server=box.address)
    strip: Callable[[dict[str, Any]], list[str]] = lambda listed: [a["agentId"] for a in listed["agents"]]  # noqa: E731
    assert strip(over_tcp) == strip(over_unix)
    assert as_json(box, "agents", "get", "pkg-found", server=box.address)["agentId"] == "pkg-found"
    # http:// names the same host:port (plaintext); dns:/// is grpc's own target syntax.
    for server in (f"http://{box.address}", f"dns:///{box.address}", f"unix://{box.socket}"):
        assert strip(as_json(box, "agents", "list", server=server)) == strip(over_unix), server
    # OPMAS_SERVER, when no --server is given.
    result = box.opmasctl(
        "agents", "get", "pkg-found", "-o", "json", server=None, env={"OPMAS_SERVER": box.address}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["agentId"] == "pkg-found"


def test_default_socket_through_runtime_directory(make_sandbox: Callable[..., Sandbox]) -> None:
    """opmasd and opmasctl agree on the socket under systemd's RuntimeDirectory= with no flags."""
    box = make_sandbox()
    box.start(env={"RUNTIME_DIRECTORY": str(box.runtime_dir)}, drop=["OPMAS_SERVICE_RUNTIME_DIR"])
    assert box.socket.is_socket()
    create(box.stub, "via-default", sleeper())
    result = box.opmasctl(
        "agents", "list", "-o", "json", server=None, env={"RUNTIME_DIRECTORY": str(box.runtime_dir)}
    )
    assert result.returncode == 0, result.stderr
    assert [a["agentId"] for a in json.loads(result.stdout)["agents"]] == ["via-default"]


def test_found_through_the_daemons_configuration(make_sandbox: Callable[..., Sandbox]) -> None:
    """No --server, no $OPMAS_SERVER: opmasctl reads the daemon's configuration ($OPMAS_CONFIG)
    for its socket, a relative path taken from the file's folder as the daemon takes it."""
    box = make_sandbox()
    box.config_file.write_text("grpc:\n  socket: run/opmasd.sock\n")  # = box.socket
    box.start()
    create(box.stub, "via-config", sleeper())
    found = box.opmasctl(
        "agents", "list", "-o", "name", server=None, env={"OPMAS_CONFIG": str(box.config_file)}
    )
    assert (found.returncode, found.stdout) == (0, "via-config\n"), found.stderr
    # Without it this daemon is not among the places tried (they are this machine's defaults).
    elsewhere = box.opmasctl("agents", "list", "-o", "name", server=None)
    assert elsewhere.stdout != "via-config\n"
