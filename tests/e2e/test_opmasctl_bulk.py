"""opmasctl on many agents at once, as an operator runs it against a real opmasd: labels set
and edited, `-l` selectors, several ids and `--all` for start/stop/restart/delete (one bulk
request, a line per agent, the exit status of the first failure), and logs of several agents."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from opmas.v1 import agents_pb2 as pb

from .harness import OPMASCTL, Sandbox, pid_alive, python_agent, sandbox, sleeper, wait_for

pytestmark = pytest.mark.timeout(120)

TICKER = python_agent(
    """
    import itertools, os, sys, time
    for n in itertools.count():
        print(f"{os.environ['AGENT_ID']} tick {n}", flush=True)
        if n % 5 == 0:
            print(f"{os.environ['AGENT_ID']} warn {n}", file=sys.stderr, flush=True)
        time.sleep(0.1)
    """
)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("opmasctl-bulk") as b:
        b.start()
        yield b


def ok(box: Sandbox, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = box.opmasctl(*args)
    assert result.returncode == code, (
        f"opmasctl {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def register(box: Sandbox, agent_id: str, *labels: str, command: list[str] | None = None) -> None:
    flags = [arg for label in labels for arg in ("--label", label)]
    ok(
        box,
        "agents",
        "register",
        "--name",
        agent_id,
        "--start-seconds",
        "0",
        *flags,
        "--start",
        "--",
        *(command or sleeper()),
    )


def state(box: Sandbox, agent_id: str) -> int:
    return box.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=agent_id), timeout=10).state


def test_labels_and_selectors(box: Sandbox) -> None:
    register(box, "sel-web-1", "env=prod", "role=web")
    register(box, "sel-web-2", "env=prod", "role=web")
    register(box, "sel-probe", "env=dev", "role=probe")
    listed = ok(box, "-o", "name", "agents", "list", "-l", "env=prod,role!=probe").stdout.split()
    assert listed == ["sel-web-1", "sel-web-2"]
    assert ok(box, "-o", "name", "agents", "status", "-l", "role in (probe)").stdout.split() == ["sel-probe"]
    bad = ok(box, "agents", "list", "-l", "env in (prod", code=1)
    assert "invalid_argument" in bad.stderr and "label_selector" in bad.stderr

    # update: --label adds or overrides, --unset-label removes, --replace-labels replaces.
    ok(box, "agents", "update", "sel-probe", "--label", "tier=edge", "--unset-label", "role")
    got = json.loads(ok(box, "-o", "json", "agents", "get", "sel-probe").stdout)
    assert got["spec"]["labels"] == {"env": "dev", "tier": "edge"}
    ok(box, "agents", "update", "sel-probe", "--replace-labels", "--label", "only=one")
    got = json.loads(ok(box, "-o", "json", "agents", "get", "sel-probe").stdout)
    assert got["spec"]["labels"] == {"only": "one"}
    bad = ok(box, "agents", "update", "sel-probe", "--label", "bad key=x", code=1)
    assert "spec.labels" in bad.stderr


def test_stop_start_restart_by_selector_ids_and_all(box: Sandbox) -> None:
    register(box, "blk-a", "group=blk")
    register(box, "blk-b", "group=blk")
    pids = [
        box.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=a), timeout=10).pid
        for a in ("blk-a", "blk-b")
    ]

    stopped = ok(box, "agents", "stop", "-l", "group=blk")
    assert stopped.stdout.splitlines() == ["agent blk-a stopped", "agent blk-b stopped"]
    assert not any(pid_alive(pid) for pid in pids)  # gone when the command returns

    # Several ids, one of them unknown: the others are started, the unknown one is an error
    # line on stderr, and the exit status is NOT_FOUND's.
    started = ok(box, "agents", "start", "blk-b", "blk-ghost", "blk-a", code=3)
    assert [line.split(" (pid")[0] for line in started.stdout.splitlines()] == [
        "agent blk-a started",
        "agent blk-b started",
    ]
    assert "error: agent blk-ghost: not_found" in started.stderr
    assert state(box, "blk-a") == state(box, "blk-b") == pb.AGENT_STATE_RUNNING

    restarted = json.loads(ok(box, "-o", "json", "agents", "restart", "-l", "group=blk").stdout)
    assert [(r["agentId"], r["code"], r["changed"]) for r in restarted["results"]] == [
        ("blk-a", "OK", True),
        ("blk-b", "OK", True),
    ]
    assert ok(box, "-o", "name", "agents", "stop", "blk-a", "blk-b", "--grace", "1").stdout.split() == [
        "blk-a",
        "blk-b",
    ]
    again = ok(box, "agents", "stop", "blk-a", "blk-b")
    assert again.stdout.splitlines() == ["agent blk-a is already stopped", "agent blk-b is already stopped"]
    none = ok(box, "agents", "stop", "-l", "group=nothing")
    assert none.stdout == "" and "no agents matched" in none.stderr

    everything = ok(box, "-o", "name", "agents", "start", "--all").stdout.split()
    assert {"blk-a", "blk-b"} <= set(everything)


@pytest.mark.parametrize(
    "args",
    [
        ("agents", "stop"),
        ("agents", "stop", "blk-a", "--all"),
        ("agents", "stop", "-l", "group=blk", "--all"),
        ("agents", "restart", "blk-a", "-l", "group=blk"),
        ("agents", "delete", "-l", " "),
        ("agents", "logs"),
    ],
)
def test_a_selection_is_exactly_one_way(box: Sandbox, args: tuple[str, ...]) -> None:
    assert "error:" in ok(box, *args, code=2).stderr


def test_delete_by_selector(box: Sandbox) -> None:
    register(box, "del-1", "doomed=yes")
    register(box, "del-2", "doomed=yes")
    deleted = ok(box, "agents", "delete", "-l", "doomed=yes")
    assert deleted.stdout.splitlines() == ["agent del-1 deleted", "agent del-2 deleted"]
    assert ok(box, "-o", "name", "agents", "list", "-l", "doomed").stdout == ""
    lines = ok(box, "-o", "json", "agents", "delete", "del-1", "del-2").stdout.splitlines()
    assert [json.loads(line)["deleted"] for line in lines] == [False, False]  # NDJSON, one per agent


def test_logs_of_several_agents(box: Sandbox) -> None:
    register(box, "log-a", "logs=yes", command=TICKER)
    register(box, "log-b", "logs=yes", command=TICKER)

    def tail(*args: str) -> list[str]:
        return ok(box, "agents", "logs", *args).stdout.splitlines()

    wait_for(lambda: len(tail("log-a", "log-b")) >= 20, timeout=20)
    merged = tail("log-a", "log-b", "--tail", "5")
    assert {line.split(" ", 1)[0] for line in merged} == {"[log-a]", "[log-b]"}
    assert all(line.split(" ", 1)[1].startswith(("log-a", "log-b", "[err] log-")) for line in merged)
    assert any("[err] " in line for line in tail("-l", "logs=yes", "--tail", "20"))
    # One agent alone: no prefix, as before.
    assert not any(line.startswith("[log-a]") for line in tail("log-a", "--tail", "10"))
    assert tail("log-a", "--tail", "0") == []
    stamped = tail("log-a", "--tail", "2", "--timestamps")
    assert all(line[:4].isdigit() and line.endswith(tuple("0123456789")) for line in stamped)

    time.sleep(0.5)
    recent = tail("log-a", "--since", "1s")
    assert 3 <= len(recent) <= 20  # about a second of ticks, not the whole log
    assert len(tail("log-a", "--since", "2000-01-01T00:00:00Z", "--tail", "100000")) > len(recent)
    assert "invalid --since" in ok(box, "agents", "logs", "log-a", "--since", "yesterday", code=2).stderr
    assert "not_found" in ok(box, "agents", "logs", "log-a", "log-ghost", code=3).stderr


def test_logs_follow_several_agents_and_tail_zero_means_only_new_lines(box: Sandbox) -> None:
    register(box, "fol-a", command=TICKER)
    register(box, "fol-b", command=TICKER)
    wait_for(lambda: box.opmasctl("agents", "logs", "fol-a", "--tail", "1").stdout.strip() != "", timeout=20)
    began = time.time()
    process = subprocess.Popen(
        [*box_opmasctl_argv(box), "agents", "logs", "fol-a", "fol-b", "-f", "--tail", "0", "--timestamps"],
        env=box.client_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen: set[str] = set()
        lines: list[str] = []
        deadline = time.monotonic() + 15
        assert process.stdout is not None
        while seen != {"[fol-a]", "[fol-b]"} and time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            seen.add(line.split(" ", 1)[0])
        assert seen >= {"[fol-a]", "[fol-b]"}, lines
        # --tail 0: nothing from before the command started.
        stamps = [line.split(" ")[1] for line in lines if line.startswith("[")]
        assert all(_epoch(stamp) >= began - 0.5 for stamp in stamps), (began, stamps)
    finally:
        process.terminate()
        process.wait(10)


def box_opmasctl_argv(box: Sandbox) -> list[str]:
    return [*OPMASCTL, "--server", str(box.socket)]


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
