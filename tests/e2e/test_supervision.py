"""Supervision by a real opmasd: crashes, backoff, crash loops, stubborn agents, and what happens
to agents when opmasd itself is killed, stopped and started again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from opmas.v1 import agents_pb2 as pb
from opmas.v1.agents_pb2_grpc import AgentServiceStub

from .harness import (
    Sandbox,
    create,
    kill_pid,
    pid_alive,
    proc_environ,
    proc_stat,
    python_agent,
    reap_orphans,
    sandbox,
    sleeper,
    spawn,
    status,
    subscribed_events,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.timeout(90)

RUNNING = pb.AGENT_STATE_RUNNING
STOPPED = pb.AGENT_STATE_STOPPED
ERROR = pb.AGENT_STATE_ERROR
BACKOFF = pb.AGENT_STATE_BACKOFF
MAX_RESTARTS = 3
# start_seconds 0: running at exec, for tests about what happens after a start.
AT_ONCE = duration_pb2.Duration()

# Ignores SIGTERM (and so do its children: an ignored signal stays ignored across fork and exec),
# with one child in its process group and one that left it for a session of its own.
STUBBORN = python_agent(
    """
    import signal, subprocess, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    in_group = subprocess.Popen(["sleep", "1000"])
    escaped = subprocess.Popen(["sleep", "1001"], start_new_session=True)
    print(f"children {in_group.pid} {escaped.pid}", flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("supervision", env={"OPMAS_AGENTS_MAX_RESTARTS": str(MAX_RESTARTS)}) as b:
        b.start()
        yield b


@pytest.fixture
def stub(box: Sandbox) -> AgentServiceStub:
    return box.stub


def _delete(stub: AgentServiceStub, *agent_ids: str) -> None:
    for agent_id in agent_ids:
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=15)


def _stop(stub: AgentServiceStub, agent_id: str) -> pb.StopAgentResponse:
    response: pb.StopAgentResponse = stub.StopAgent(pb.StopAgentRequest(agent_id=agent_id), timeout=15)
    return response


# -- crashes ------------------------------------------------------------------------------------


def test_killed_agent_is_restarted_with_backoff(box: Sandbox, stub: AgentServiceStub) -> None:
    first = create(stub, "crashy", sleeper(), start=True).status.pid
    try:
        pids = [first]
        for n in (1, 2):
            os.kill(pids[-1], signal.SIGKILL)
            s = wait_state(stub, "crashy", RUNNING, check=lambda s: s.pid not in (0, *pids))
            assert s.restart_count == n
            assert s.last_exit.signal == signal.SIGKILL
            assert s.last_exit.reason == "killed by SIGKILL"
            assert s.desired_state == pb.DESIRED_STATE_RUNNING
            assert box.agent_pids("crashy") == [s.pid]
            pids.append(s.pid)
        assert not any(pid_alive(pid) for pid in pids[:-1])
        box.daemon.no_zombie_children()
    finally:
        _delete(stub, "crashy")


def test_exit_code_is_recorded_and_backoff_grows(box: Sandbox, stub: AgentServiceStub) -> None:
    stub.CreateAgent(
        pb.CreateAgentRequest(
            # No start window: this is about the exits of agents that did start.
            agent_id="exit3",
            spec=pb.AgentSpec(name="exit3", command=["sh", "-c", "sleep 0.3; exit 3"], start_seconds=AT_ONCE),
        )
    )
    reader = subscribed_events(stub, ["exit3"])
    try:
        stub.StartAgent(pb.StartAgentRequest(agent_id="exit3"), timeout=10)
        s = wait_state(stub, "exit3", ERROR, timeout=15)
        assert s.last_exit.exit_code == 3
        assert s.last_exit.signal == 0
        assert s.last_exit.reason == "exited with code 3"
        assert s.restart_count == MAX_RESTARTS
        assert "crash loop" in s.state_reason
        assert s.pid == 0
        events = [e for e in reader.snapshot() if e.agent_id == "exit3"]
        backoffs = [e.reason for e in events if e.state == BACKOFF]
        # The first restart is immediate, then the delay doubles from backoff_initial (0.1 s).
        assert backoffs == [
            "exited with code 3; restart 1/3 now",
            "exited with code 3; restart 2/3 in 0.1s",
            "exited with code 3; restart 3/3 in 0.2s",
        ], backoffs
        pids = {e.status.pid for e in events if e.state == RUNNING}
        assert len(pids) == MAX_RESTARTS + 1, "each restart is a new process"
        assert box.agent_pids("exit3") == []
    finally:
        reader.cancel()
        _delete(stub, "exit3")


def test_crash_loop_ends_in_error_and_a_start_resets_it(box: Sandbox, stub: AgentServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        create(stub, "looper", ["sh", "-c", "exit 1"], start=True)
    # The start answers with the outcome of the start window, not with "started".
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "agent looper failed to start: exited with code 1 after" in (failed.value.details() or "")
    try:
        s = wait_state(stub, "looper", ERROR, timeout=15)
        assert "failed to start: exited with code 1" in s.state_reason
        assert "crash loop" in s.state_reason
        assert f"gave up after {MAX_RESTARTS} restarts" in s.state_reason
        assert s.restart_count == MAX_RESTARTS
        assert s.last_exit.exit_code == 1
        # It stays given up: no more restarts.
        time.sleep(0.5)
        assert status(stub, "looper").state == ERROR
        assert status(stub, "looper").restart_count == MAX_RESTARTS
        # An operator's start is a fresh start.
        stub.UpdateAgent(pb.UpdateAgentRequest(agent_id="looper", spec=pb.AgentSpec(command=sleeper())))
        began = time.monotonic()
        started = stub.StartAgent(pb.StartAgentRequest(agent_id="looper"), timeout=10)
        # Answered once it stayed up for its start window (the default 1 s), as RUNNING.
        assert started.changed and started.status.state == RUNNING
        assert time.monotonic() - began >= 0.9
        assert started.status.restart_count == 0
        box.daemon.no_zombie_children()
    finally:
        _delete(stub, "looper")


@pytest.mark.parametrize(
    ("policy", "code", "final", "restarted"),
    [
        (pb.RESTART_POLICY_NEVER, 3, ERROR, False),
        (pb.RESTART_POLICY_NEVER, 0, STOPPED, False),
        (pb.RESTART_POLICY_ON_FAILURE, 0, STOPPED, False),
        (pb.RESTART_POLICY_ALWAYS, 0, None, True),
    ],
)
def test_restart_policies(
    box: Sandbox,
    stub: AgentServiceStub,
    policy: pb.RestartPolicy.ValueType,
    code: int,
    final: pb.AgentState.ValueType | None,
    restarted: bool,
) -> None:
    agent_id = f"policy-{policy}-{code}"
    first = create(
        stub,
        agent_id,
        ["sh", "-c", f"sleep 0.2; exit {code}"],
        start=True,
        restart_policy=policy,
        start_seconds=AT_ONCE,  # the policies for agents that did start
    )
    try:
        if restarted:
            s = wait_for(
                lambda: (s := status(stub, agent_id)).restart_count >= 1 and s,
                what="a restart after a clean exit",
            )
            assert s.last_exit.exit_code == code
        else:
            s = wait_state(stub, agent_id, final or STOPPED)
            assert s.restart_count == 0
            assert s.last_exit.exit_code == code
            time.sleep(0.3)
            assert status(stub, agent_id).state == final
        assert first.status.pid > 0
    finally:
        _delete(stub, agent_id)


# -- stopping -----------------------------------------------------------------------------------


def test_agent_ignoring_sigterm_is_killed_with_its_children_after_stop_timeout(
    box: Sandbox, stub: AgentServiceStub
) -> None:
    create(stub, "stubborn", STUBBORN, start=True, stop_timeout=duration_pb2.Duration(seconds=1))
    try:
        pids = wait_for(
            lambda: len(p := box.agent_pids("stubborn")) == 3 and p, what="the agent and its children"
        )
        leader = status(stub, "stubborn").pid
        assert leader in pids
        began = time.monotonic()
        response = _stop(stub, "stubborn")
        took = time.monotonic() - began
        assert response.changed and response.status.state == STOPPED
        assert response.status.last_exit.signal == signal.SIGKILL
        assert 0.9 <= took < 3.0, f"stop took {took:.2f}s; the stop_timeout is 1s"
        assert [pid for pid in pids if pid_alive(pid)] == []
        assert box.agent_pids("stubborn") == []
        box.daemon.no_zombie_children()

        # The request's timeout overrides the agent's.
        stub.StartAgent(pb.StartAgentRequest(agent_id="stubborn"), timeout=10)
        pids = wait_for(
            lambda: len(p := box.agent_pids("stubborn")) == 3 and p, what="the agent and its children"
        )
        began = time.monotonic()
        stub.StopAgent(
            pb.StopAgentRequest(agent_id="stubborn", timeout=duration_pb2.Duration(nanos=300_000_000)),
            timeout=15,
        )
        took = time.monotonic() - began
        assert 0.25 <= took < 0.9 + 1.0, f"stop took {took:.2f}s with a 0.3s timeout"
        assert [pid for pid in pids if pid_alive(pid)] == []
    finally:
        _delete(stub, "stubborn")


def test_agent_that_exits_on_sigterm_stops_at_once(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "polite", sleeper(), start=True, stop_timeout=duration_pb2.Duration(seconds=10))
    try:
        began = time.monotonic()
        response = _stop(stub, "polite")
        assert time.monotonic() - began < 2.0
        assert response.status.last_exit.signal == signal.SIGTERM
    finally:
        _delete(stub, "polite")


# -- opmasd restarts ----------------------------------------------------------------------------


def _fleet(stub: AgentServiceStub) -> dict[str, int]:
    """Four agents: two running, one stopped after running, one never started. Their pids."""
    pids = {}
    for agent_id in ("run-a", "run-b", "was-running", "never-started"):
        create(stub, agent_id, sleeper())
    for agent_id in ("run-a", "run-b", "was-running"):
        pids[agent_id] = stub.StartAgent(pb.StartAgentRequest(agent_id=agent_id), timeout=10).status.pid
    _stop(stub, "was-running")
    return pids


def _check_store_is_whole(box: Sandbox) -> None:
    """No half-written row: the database is consistent and every row the daemon can read."""
    if box.backend == "sqlite":
        assert box.sql("PRAGMA integrity_check") == [("ok",)]
    rows = box.sql("SELECT agent_id, state, desired FROM agents ORDER BY agent_id")
    assert [r[0] for r in rows] == ["never-started", "run-a", "run-b", "was-running"]
    orphans = box.sql(
        "SELECT COUNT(*) FROM agent_transitions t LEFT JOIN agents a ON a.agent_id = t.agent_id "
        "WHERE a.agent_id IS NULL"
    )
    assert orphans == [(0,)]


def test_sigkill_of_opmasd_then_restart_adopts_the_same_processes(
    make_sandbox: Callable[..., Sandbox], backend: str
) -> None:
    box = make_sandbox(backend=backend)
    box.start()
    pids = _fleet(box.stub)
    first_daemon = box.daemon.pid

    box.daemon.kill()
    # The agents do not depend on opmasd.
    assert all(pid_alive(pids[a]) for a in ("run-a", "run-b"))
    _check_store_is_whole(box)

    box.start()
    assert box.daemon.pid != first_daemon
    stub = box.stub
    for agent_id in ("run-a", "run-b"):
        s = status(stub, agent_id)
        assert s.state == RUNNING, s
        assert s.pid == pids[agent_id]
        assert "re-adopted" in s.state_reason
        assert s.desired_state == pb.DESIRED_STATE_RUNNING
        assert box.agent_pids(agent_id) == [pids[agent_id]], "exactly one process per agent"
    for agent_id in ("was-running", "never-started"):
        s = status(stub, agent_id)
        assert (s.state, s.desired_state, s.pid) == (STOPPED, pb.DESIRED_STATE_STOPPED, 0)
        assert box.agent_pids(agent_id) == []
    assert len(box.processes()) == 2

    # The log written before the kill is still there.
    lines = [line.line for line in stub.GetAgentLogs(pb.GetAgentLogsRequest(agent_id="run-a"), timeout=5)]
    assert "hello from run-a" in lines

    # An adopted process is supervised like any other: its exit is noticed and it is restarted.
    os.kill(pids["run-a"], signal.SIGKILL)
    s = wait_state(stub, "run-a", RUNNING, check=lambda s: s.pid not in (0, pids["run-a"]))
    assert s.restart_count == 1
    assert "adopted" in s.last_exit.reason  # an adopted process's exit status is not ours to read
    assert box.agent_pids("run-a") == [s.pid]
    # And stopped like any other.
    _stop(stub, "run-b")
    assert not pid_alive(pids["run-b"])
    assert box.agent_pids("run-b") == []


def test_graceful_restart_of_opmasd_honours_desired_state(
    make_sandbox: Callable[..., Sandbox], backend: str
) -> None:
    box = make_sandbox(backend=backend)
    box.start()
    pids = _fleet(box.stub)

    assert box.daemon.stop() == 0
    # A graceful stop stops the agents (stop_agents_on_shutdown), but remembers what is desired.
    assert box.processes() == []
    assert not any(pid_alive(pid) for pid in pids.values())
    _check_store_is_whole(box)

    box.start()
    stub = box.stub
    for agent_id in ("run-a", "run-b"):
        s = wait_state(stub, agent_id, RUNNING)  # started again, through a start window
        assert (s.state, s.desired_state) == (RUNNING, pb.DESIRED_STATE_RUNNING)
        assert s.pid not in (0, pids[agent_id])
        assert box.agent_pids(agent_id) == [s.pid]
    for agent_id in ("was-running", "never-started"):
        s = status(stub, agent_id)
        assert (s.state, s.desired_state, s.pid) == (STOPPED, pb.DESIRED_STATE_STOPPED, 0)
    listed = {a.agent_id: a.status for a in stub.ListAgents(pb.ListAgentsRequest(), timeout=5).agents}
    assert listed["run-a"].uptime.ToNanoseconds() >= 0 and listed["run-a"].pid > 0
    assert listed["was-running"].last_exit.signal == signal.SIGTERM

    # Stopped by the operator now, it stays stopped across the next restart too.
    _stop(stub, "run-b")
    box.restart()
    assert status(box.stub, "run-b").state == STOPPED
    wait_state(box.stub, "run-a", RUNNING)  # stopped by the graceful shutdown: a new start window
    assert len(box.processes()) == 1


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_agent_that_died_while_opmasd_was_down_is_restarted_not_adopted(
    make_sandbox: Callable[..., Sandbox], reaped: bool
) -> None:
    box = make_sandbox()
    box.start()
    old = create(box.stub, "lost", sleeper(), start=True).status.pid
    box.daemon.kill()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), what="the agent to die")
    # Orphaned by the SIGKILL, the agent is now a child of this test process (a subreaper).
    # Reaped, its PID is free; not reaped (an init that never reaps), it is a zombie.
    if reaped:
        reap_orphans()
        assert proc_stat(old) is None
    else:
        assert proc_stat(old) is not None

    box.start()
    s = wait_state(box.stub, "lost", RUNNING)
    assert s.pid not in (0, old)
    assert s.restart_count == 0, "not a crash seen by opmasd: a fresh start"
    assert box.agent_pids("lost") == [s.pid]
    reasons = [
        r[0] for r in box.sql("SELECT reason FROM agent_transitions WHERE agent_id = 'lost' ORDER BY id")
    ]
    assert not any("adopted" in r for r in reasons), reasons
    assert any(f"process {old} ended while opmasd was not running" in r for r in reasons), reasons


def test_pid_reused_by_another_process_is_not_adopted_nor_killed(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    box = make_sandbox()
    box.start()
    old = create(box.stub, "reused", sleeper(), start=True).status.pid
    box.daemon.kill()
    os.kill(old, signal.SIGKILL)
    # Start times are compared at clock-tick (10 ms) precision: a decoy started in the same tick
    # would be indistinguishable, as it would be to any tool. A real PID reuse is far later.
    time.sleep(0.1)
    # Another process now holds the PID the store remembers (as after a PID wrap-around).
    decoy = spawn([sys.executable, "-c", "import time; time.sleep(1000)"])
    try:
        box.sql("UPDATE agents SET pid = ? WHERE agent_id = 'reused'", [decoy.pid])
        box.start()
        s = wait_state(box.stub, "reused", RUNNING)
        assert s.pid not in (0, old, decoy.pid)
        assert decoy.poll() is None, "opmasd killed a process that was not its agent"
        assert box.agent_pids("reused") == [s.pid]
        _stop(box.stub, "reused")
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()
        kill_pid(old)


# -- an accepted operation finishes, whatever its caller does --------------------------------------


def test_a_stop_whose_client_gives_up_still_ends_in_stopped(box: Sandbox, stub: AgentServiceStub) -> None:
    """A client deadline cancels the call, never the stop: SIGKILL still comes after the agent's
    stop_timeout, the agent ends stopped, and a start afterwards runs exactly one process."""
    create(stub, "gives-up", STUBBORN, start=True, stop_timeout=duration_pb2.Duration(seconds=3))
    pid = status(stub, "gives-up").pid
    # Its children exist once it ignores SIGTERM.
    wait_for(lambda: len(box.processes(AGENT_ID="gives-up")) == 3, 10, what="the agent and its children")
    with pytest.raises(grpc.RpcError) as raised:
        stub.StopAgent(pb.StopAgentRequest(agent_id="gives-up"), timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stopped = wait_state(stub, "gives-up", STOPPED, timeout=15)
    assert "SIGKILL" in stopped.state_reason, stopped.state_reason
    assert not pid_alive(pid)
    started = stub.StartAgent(pb.StartAgentRequest(agent_id="gives-up"), timeout=10)
    assert started.changed and started.status.pid not in (0, pid)
    # The agent and its two children, once: nothing of the first run was left behind.
    wait_for(lambda: len(box.processes(AGENT_ID="gives-up")) == 3, 10, what="one agent, two children")
    time.sleep(0.3)
    assert len(box.processes(AGENT_ID="gives-up")) == 3
    stub.StopAgent(pb.StopAgentRequest(agent_id="gives-up"), timeout=20)
    stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="gives-up"), timeout=20)


# Counts the SIGTERMs it and its child (in its group) receive, each into a file of its own; each
# exits a while after its first (the child after 0.5 s, the leader after 2 s), so that a second
# SIGTERM would still be counted. (Descendants that left the group: tests/unit/test_signals.py.)
COUNTER = python_agent(
    """
    import os, signal, subprocess, sys, time
    child = r'''
    import os, signal, sys, time
    seen = 0
    def on_term(*_):
        global seen
        seen += 1
        open(sys.argv[1], "w").write(str(seen))
    signal.signal(signal.SIGTERM, on_term)
    open(sys.argv[1], "w").write("0")
    deadline = None
    while True:
        time.sleep(0.05)
        if seen and deadline is None:
            deadline = time.monotonic() + float(sys.argv[2])
        if deadline and time.monotonic() > deadline:
            sys.exit(0)
    '''
    folder = os.environ["COUNT_DIR"]
    kid = subprocess.Popen([sys.executable, "-c", child, f"{folder}/in-group", "0.5"])
    os.execv(sys.executable, [sys.executable, "-c", child, f"{folder}/leader", "2"])
    """
)


def test_a_stop_sends_each_process_exactly_one_sigterm_and_the_stop_budget(
    box: Sandbox, stub: AgentServiceStub, tmp_path: Path
) -> None:
    folder = tmp_path / "counts"
    folder.mkdir()
    create(
        stub,
        "counter",
        COUNTER,
        start=True,
        environment={"COUNT_DIR": str(folder)},
        stop_timeout=duration_pb2.Duration(seconds=7),
    )
    names = ("leader", "in-group")
    wait_for(lambda: all((folder / n).exists() for n in names), 10, what="two processes counting")
    leader = status(stub, "counter").pid
    assert proc_environ(leader)["AGENT_STOP_TIMEOUT"] == "7"
    stub.StopAgent(pb.StopAgentRequest(agent_id="counter"), timeout=20)
    wait_for(lambda: not box.processes(AGENT_ID="counter"), 10, what="the agent's tree gone")
    assert {n: (folder / n).read_text() for n in names} == dict.fromkeys(names, "1")
    stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="counter"), timeout=20)


def test_a_second_sigterm_forces_the_exit_within_two_seconds(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    """Even with an agent that will not die: it is left running (a later opmasd re-adopts it)."""
    box = make_sandbox("forced-exit")
    box.start()
    create(box.stub, "will-not-die", STUBBORN, start=True, stop_timeout=duration_pb2.Duration(seconds=60))
    wait_for(lambda: len(box.processes(AGENT_ID="will-not-die")) == 3, 10, what="the agent and its children")
    pid = status(box.stub, "will-not-die").pid
    daemon = box.daemon
    os.kill(daemon.pid, signal.SIGTERM)
    time.sleep(0.5)  # the first stops the agents: this one would take a minute
    assert daemon.popen.poll() is None
    forced_at = time.monotonic()
    os.kill(daemon.pid, signal.SIGTERM)
    code = daemon.popen.wait(10)
    assert time.monotonic() - forced_at < 2.0, "the second SIGTERM did not force the exit"
    assert code == 0
    assert pid_alive(pid)  # left running for the next opmasd
    adopted = box.start()
    assert status(box.stub, "will-not-die").pid == pid and adopted.running
    quick = pb.StopAgentRequest(agent_id="will-not-die", timeout=duration_pb2.Duration(nanos=100_000_000))
    box.stub.StopAgent(quick, timeout=20)
