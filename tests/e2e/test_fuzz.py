"""Property-based fuzzing of a real opmasd: every RPC of AgentService and every NATS subject it
reads, with generated and with mutated messages (strategies in fuzz_messages.py).

test_bad_input.py checks chosen bad requests one by one; this module asks what no list of
chosen cases can: whether *anything* a client sends can break the daemon. The properties, for
every request:

1. Answered, never with INTERNAL or UNKNOWN: gRPC status codes, and on NATS a §5 reply whose
   code is not INTERNAL (no reply at all counts as a failure too). Undecodable bytes are
   INVALID_ARGUMENT. An agent.status / agent.metrics message has no reply; after one, reading
   the agents it names (GetAgentMetrics, GetAgentStatus, the manager's "get") must still work.
2. No crash: the daemon is alive after every request, and its log gains no traceback and no
   error record while the fuzz runs (the sandbox's teardown checks the whole log again).
3. No state change on rejected input: the agents' specs, desired states and the set of agents
   (ListAgents) are compared before and after each request. A rejected request (a code that
   says the input was wrong: INVALID_ARGUMENT, NOT_FOUND, ...) and a read-only one change
   nothing at all; an accepted one changes only the agent it names (CreateAgent: only the
   agent it answers with); an attempted one that failed (FAILED_PRECONDITION: a start that
   failed leaves the agent registered, as documented) changes at most that agent.
4. Bounded memory: the daemon runs under RLIMIT_AS (so a runaway read fails alone instead of
   waking the machine's OOM killer) and its RSS grows less than RSS_GROWTH_LIMIT from after a
   warm-up to the end of the run.

Each test first sends a few explicit edge cases (fuzz_messages: explicit_*; each once broke
the daemon), then a few dozen to a few hundred drawn ones. The run is reproducible
(derandomized: the same examples every time) and takes about 20 s, so it fits `make test`: one
daemon serves the module, each example is followed by putting the known agents back as they
were, and a failure is reported as found, unshrunk (see fuzz()).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import grpc
import nats.errors
import pytest
from google.protobuf import duration_pb2, message_factory, text_format
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from opmas.v1 import agents_pb2 as pb

from .fuzz_messages import (
    MANIFEST_KEYS,
    Targets,
    alias_bomb_manifest,
    explicit_heartbeats,
    explicit_manager_requests,
    explicit_metrics_reports,
    explicit_raw_requests,
    explicit_requests,
    generated_requests,
    heartbeats,
    manager_requests,
    metrics_reports,
    raw_requests,
)
from .harness import Sandbox, sandbox, sleeper, write_package
from .nats_client import NatsClient
from .test_nats import healthy, probe_package

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]
METHODS = tuple(m.name for m in SERVICE.methods)
READ_ONLY = frozenset(
    {
        "ListAgents",
        "GetAgent",
        "GetAgentStatus",
        "GetAgentMetrics",
        "GetAgentLogs",
        "WatchEvents",
        "SendCommand",
    }
)
# Codes that say the request itself was wrong: such a request must leave everything as it was.
REJECTED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
BULK = frozenset({"StartAgents", "StopAgents", "RestartAgents"})
REJECTED_NAMES = frozenset(code.name for code in REJECTED)
FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

# Every unary call is answered in milliseconds; 15 s without an answer is a hang, not load.
UNARY_DEADLINE = 15.0
# GetAgentLogs(follow) and WatchEvents stay open until the client goes: a short deadline ends
# them (DEADLINE_EXCEEDED is then the normal end of the call, not a verdict).
STREAM_DEADLINE = 0.1
NATS_TIMEOUT = 5.0
# How much of a request a failure message quotes (its whole length is given too).
SHOWN = 2000
ADDRESS_SPACE = 3 << 30
RSS_GROWTH_LIMIT = 50 << 20

PROBE = "probe"  # an SDK agent that answers commands: SendCommand reaches a real agent
KNOWN: dict[str, tuple[pb.AgentSpec, bool]] = {
    "known-stopped": (
        pb.AgentSpec(
            name="known-stopped",
            description="left stopped",
            command=sleeper(),
            environment={"KNOWN": "1"},
            stop_timeout=duration_pb2.Duration(seconds=2),
            start_seconds=duration_pb2.Duration(),
        ),
        False,
    ),
    "known-running": (
        pb.AgentSpec(
            name="known-running",
            type="fuzzed",
            command=sleeper(),
            stop_timeout=duration_pb2.Duration(seconds=2),
            start_seconds=duration_pb2.Duration(),
        ),
        True,
    ),
}


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same examples on every run and machine
        database=None,  # nothing to replay: a derandomized run finds the same examples again
        print_blob=False,
        # No shrinking: against a live daemon each replay of a failure may cost a deadline (a
        # request with no reply costs NATS_TIMEOUT), and hypothesis would take an interrupting
        # pytest-timeout for one more failure to shrink. The failing request is reported as
        # generated, with the daemon's answer and log.
        phases=(Phase.explicit, Phase.generate),
        report_multiple_bugs=False,  # the first failure ends the run: each may cost a deadline
        suppress_health_check=list(HealthCheck),  # big draws and slow examples are the point
    )


# Examples per method, where not the default (60 generated, 40 mutated): fewer where each
# valid call waits out STREAM_DEADLINE, more where rare combinations matter (a running agent,
# a valid spec, params too big for NATS).
GENERATED_EXAMPLES = {
    "WatchEvents": 30,
    "GetAgentLogs": 40,
    "DiscoverAgents": 1,
    "SendCommand": 120,
    "CreateAgent": 100,
    "UpdateAgent": 80,
}
MUTATED_EXAMPLES = {"WatchEvents": 25, "GetAgentLogs": 30, "SendCommand": 60, "CreateAgent": 60}


class AgentKey(NamedTuple):
    """What a request may or may not change of an agent (observed state is the daemon's own)."""

    spec: bytes
    desired: int
    source: int
    manifest_path: str
    node: str
    create_time: int


Snapshot = dict[str, AgentKey]


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]


class Shown(Generic[T]):
    """A drawn value that prints short: hypothesis prints each draw of a failing example, and
    some are megabytes of one repeated character."""

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        value: Any = self.value
        text = text_format.MessageToString(value) if isinstance(value, Message) else repr(value)
        return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def shown(value: T) -> st.SearchStrategy[Shown[T]]:
    # Through flatmap, not map: hypothesis prints a mapped value as the call that made it, which
    # would print the inner value whole.
    return st.just(Shown(value))


def request_class(method: str) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)
    return cls


def describe(method: str, payload: bytes) -> str:
    """The request as the server would read it (long strings cut), or its bytes when undecodable."""
    try:
        text = text_format.MessageToString(request_class(method).FromString(payload), as_one_line=True)
    except (DecodeError, RecursionError, ValueError):
        return f"undecodable {payload[:120]!r} ({len(payload)} bytes)"
    return text if len(text) <= SHOWN else text[:SHOWN] + f"... ({len(payload)} bytes)"


def changed(before: Snapshot, after: Snapshot) -> set[str]:
    return {
        agent_id for agent_id in before.keys() | after.keys() if before.get(agent_id) != after.get(agent_id)
    }


def show_changes(before: Snapshot, after: Snapshot, agent_ids: set[str]) -> str:
    """The changed agents, briefly: what each was and became (specs cut short)."""

    def brief(key: AgentKey | None) -> str:
        if key is None:
            return "absent"
        spec = text_format.MessageToString(pb.AgentSpec.FromString(key.spec), as_one_line=True)
        desired = pb.DesiredState.Name(key.desired)  # type: ignore[arg-type]
        return f"{desired} {spec[:300]}"

    return "; ".join(f"{i}: {brief(before.get(i))} => {brief(after.get(i))}" for i in sorted(agent_ids))


def problem(record: dict[str, Any]) -> bool:
    """A log record that says the daemon met something it did not expect."""
    return (
        "exception" in record
        or record.get("level") in ("error", "critical")
        or record.get("event") in ("NATS client error", "request handler failed")
    )


class World:
    """The daemon under fuzz, its known agents, and the checks made around every request."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.pid = box.daemon.pid
        self.stub = box.stub
        self.channel = box.daemon.channel()
        self.nats: NatsClient = box.nats()
        self._log_offset = 0
        self.probe_manifest = str(box.agents_dir / PROBE / "agent.yaml")
        self.targets = Targets(
            mutable=tuple(KNOWN),
            readable=(PROBE,),
            running=(*(agent_id for agent_id, (_, running) in KNOWN.items() if running), PROBE),
            # The valid one first (the mutations' seed), the hostile ones next: hypothesis draws
            # the first elements of a list most.
            manifests=(
                str(box.extra_dir / "valid"),
                str(box.extra_dir / "fifo"),
                *(str(box.extra_dir / f"laughs-{key}" / "agent.yaml") for key in MANIFEST_KEYS),
                str(box.agents_dir / "broken" / "agent.yaml"),
                self.probe_manifest,
                "/dev/zero",
                "/dev/urandom",
                "/proc/self/environ",
                "/proc/self/mem",
                "/etc/shadow",
            ),
        )
        self.original: Snapshot = {}
        self.rss_after_warmup = 0

    # -- calls --------------------------------------------------------------------------------

    def invoke(self, method: str, payload: bytes) -> Outcome:
        """One call with these exact request bytes (no client-side serialization to refuse them)."""
        path = f"/{SERVICE.full_name}/{method}"
        replies: list[bytes] = []
        try:
            if SERVICE.methods_by_name[method].server_streaming:
                stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(path)
                for item in stream(payload, timeout=STREAM_DEADLINE):
                    replies.append(item)
            else:
                unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(path)
                replies.append(unary(payload, timeout=UNARY_DEADLINE))
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call)
            return Outcome(err.code(), err.details() or "", replies)
        return Outcome(grpc.StatusCode.OK, "", replies)

    def snapshot(self) -> Snapshot:
        response = self.stub.ListAgents(pb.ListAgentsRequest(page_size=1000), timeout=10)
        assert not response.next_page_token, "more agents than one page: the cleanup failed"
        return {
            a.agent_id: AgentKey(
                a.spec.SerializeToString(deterministic=True),
                a.status.desired_state,
                a.source,
                a.manifest_path,
                a.node,
                a.create_time.ToNanoseconds(),
            )
            for a in response.agents
        }

    # -- health -------------------------------------------------------------------------------

    def new_problems(self) -> list[str]:
        """Problem records (and raw tracebacks) the daemon logged since the last look."""
        with open(self.box.daemon.stderr_path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        found = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    found.append(line)
                continue
            if isinstance(record, dict) and problem(record):
                found.append(json.dumps(record)[:3000])
        return found

    def daemon_problems(self) -> list[str]:
        """Whether opmasd died, and the problems it logged, since the last look."""
        problems = [f"opmasd logged: {record}" for record in self.new_problems()]
        if not self.box.daemon.running:
            problems.append(f"opmasd exited:\n{self.box.stderr_report(40)}")
        return problems

    def assert_healthy(self, context: str) -> None:
        problems = self.daemon_problems()
        assert not problems, f"after {context}:\n" + "\n".join(problems)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for opmasd {self.pid}")

    # -- the known agents ---------------------------------------------------------------------

    def create_known(self, agent_id: str) -> None:
        spec, running = KNOWN[agent_id]
        self.stub.CreateAgent(pb.CreateAgentRequest(agent_id=agent_id, spec=spec, start=running), timeout=10)

    def reset(self) -> None:
        """Back to the start: fuzz-made agents deleted, known agents as first registered, the
        probe running. Outside any checked request, so its changes are nobody's verdict."""
        now = self.snapshot()
        for agent_id in now:
            if agent_id not in KNOWN and agent_id != PROBE:
                self.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=15)
        for agent_id in KNOWN:
            was, is_ = self.original[agent_id], now.get(agent_id)
            if is_ is None or (is_.spec, is_.desired) != (was.spec, was.desired):
                if is_ is not None:
                    self.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=15)
                self.create_known(agent_id)
        probe = now.get(PROBE)
        if probe is None:  # deleted: it comes back registered from its manifest
            self.stub.CreateAgent(
                pb.CreateAgentRequest(manifest_path=self.probe_manifest, start=True), timeout=15
            )
        elif (probe.spec, probe.desired) != (self.original[PROBE].spec, self.original[PROBE].desired):
            self.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=PROBE), timeout=15)
            self.stub.CreateAgent(
                pb.CreateAgentRequest(manifest_path=self.probe_manifest, start=True), timeout=15
            )

    def forget_reports(self) -> None:
        """Overwrite what the agents last reported, so that no example inherits the metrics (or
        a poisoned Struct) of the one before; then wait until the daemon has taken them."""
        for agent_id in (*KNOWN, PROBE):
            self.nats.publish("agent.metrics", {"agent_id": agent_id, "metrics": {}})
        self.nats.request("agent.manager.query", {"command": "list"}, NATS_TIMEOUT)

    # -- the properties -----------------------------------------------------------------------

    def check_rpc(self, method: str, payload: bytes) -> None:
        before = self.snapshot()
        outcome = self.invoke(method, payload)
        code = outcome.code
        context = f"{method}({describe(method, payload)}) -> {code.name}: {outcome.details[:400]}"
        problems = self.daemon_problems()  # at once: what this call logged is blamed on it
        if code in FORBIDDEN:
            problems.append(f"answered {code.name}")
        # A unary call that runs out of our deadline hangs; the server's own DEADLINE_EXCEEDED
        # (SendCommand: the agent did not answer in time) says why, and is a fine answer.
        streaming = SERVICE.methods_by_name[method].server_streaming
        if (
            not streaming
            and code == grpc.StatusCode.DEADLINE_EXCEEDED
            and outcome.details == "Deadline Exceeded"
        ):
            problems.append(f"no answer within {UNARY_DEADLINE:g}s")
        try:
            request: Message | None = request_class(method).FromString(payload)
        except (DecodeError, RecursionError, ValueError):
            request = None
            if code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                problems.append("the request cannot be decoded, and yet it was not INVALID_ARGUMENT")
        if self.box.daemon.running:
            after = self.snapshot()
            unexpected = self.unexpected_changes(method, request, outcome, before, after)
            if unexpected:
                problems.append(f"it changed {show_changes(before, after, unexpected)}")
        assert not problems, f"{context}\n" + "\n".join(problems)

    @staticmethod
    def unexpected_changes(
        method: str, request: Message | None, outcome: Outcome, before: Snapshot, after: Snapshot
    ) -> set[str]:
        """The agents this call changed that it had no business changing (see property 3)."""
        diff = changed(before, after)
        if not diff:
            return diff
        if method in READ_ONLY or outcome.code in REJECTED or request is None:
            return diff
        if method == "DiscoverAgents":
            return set()  # a scan may register and update what it finds
        if method == "CreateAgent":
            new = diff - before.keys()
            if outcome.code == grpc.StatusCode.OK:
                created = pb.Agent.FromString(outcome.replies[0]).agent_id
                assert created in after, f"CreateAgent answered {created}, which is not listed"
                return diff - {created}
            return diff - new if len(new) == 1 else diff
        if method in BULK and outcome.code == grpc.StatusCode.OK:
            # A bulk call may change exactly the agents it reports a result for.
            reply = request_class(method).__name__.replace("Request", "Response")
            results = getattr(pb, reply).FromString(outcome.replies[0]).results
            return diff - {result.agent_id for result in results}
        return diff - {getattr(request, "agent_id", "")}

    def check_manager(self, subject: str, payload: bytes) -> None:
        before = self.snapshot()
        try:
            reply = self.nats.request(subject, payload, timeout=NATS_TIMEOUT)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            reply = f"no reply ({type(exc).__name__})"
        context = f"{subject} <- {payload[:SHOWN]!r} ({len(payload)} bytes) -> {str(reply)[:400]}"
        problems = self.daemon_problems()
        if not (isinstance(reply, dict) and reply.get("status") in ("success", "error")):
            problems.append("no §5 reply")
        elif reply.get("code") == "INTERNAL":
            problems.append("answered INTERNAL")
        if self.box.daemon.running and isinstance(reply, dict):
            after = self.snapshot()
            diff = changed(before, after)
            if subject.endswith(".query") or reply.get("code") in REJECTED_NAMES:
                unexpected = diff
            elif reply.get("status") == "success" and reply.get("command") == "discover":
                unexpected = set()
            else:
                unexpected = diff - {_json_field(payload, "agent_id")}
            if unexpected:
                problems.append(f"it changed {show_changes(before, after, unexpected)}")
        assert not problems, f"{context}\n" + "\n".join(problems)

    def check_intake(self, subject: str, payload: bytes) -> None:
        before = self.snapshot()
        context = f"{subject} <- {payload[:SHOWN]!r} ({len(payload)} bytes)"
        self.nats.publish(subject, payload)
        # The intake has no reply: read what it may have stored instead. The manager's answer
        # comes after the message was taken (the daemon reads its connection in order).
        problems = []
        for agent_id in (*KNOWN, PROBE):
            query = {"command": "get", "agent_id": agent_id}
            try:
                got = self.nats.request("agent.manager.query", query, NATS_TIMEOUT)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                got = f"no reply ({type(exc).__name__})"
            if not (isinstance(got, dict) and got.get("status") == "success"):
                problems.append(f"then get {agent_id} -> {str(got)[:400]}")
            for method, request in (
                ("GetAgentMetrics", pb.GetAgentMetricsRequest(agent_id=agent_id)),
                ("GetAgentStatus", pb.GetAgentStatusRequest(agent_id=agent_id)),
            ):
                outcome = self.invoke(method, request.SerializeToString())
                if outcome.code != grpc.StatusCode.OK:
                    problems.append(
                        f"then {method}({agent_id}) -> {outcome.code.name}: {outcome.details[:400]}"
                    )
        problems += self.daemon_problems()
        if self.box.daemon.running:
            after = self.snapshot()
            if before != after:
                problems.append(f"it changed {show_changes(before, after, changed(before, after))}")
        assert not problems, f"{context}\n" + "\n".join(problems)


def _json_field(payload: bytes, name: str) -> str:
    with contextlib.suppress(ValueError):
        obj = json.loads(payload)
        if isinstance(obj, dict) and isinstance(obj.get(name), str):
            return str(obj[name])
    return ""


# -- the daemon ---------------------------------------------------------------------------------


def _prepare_packages(box: Sandbox) -> None:
    probe_package(box.agents_dir, PROBE)
    write_package(box.agents_dir, "broken", "name: broken\n  entrypoint: : [\n")
    write_package(box.extra_dir, "valid", {"name": "fz-manifest", "entrypoint": ["/bin/sleep", "1000"]})
    for key in MANIFEST_KEYS:
        write_package(box.extra_dir, f"laughs-{key}", alias_bomb_manifest(key))
    os.mkfifo(box.extra_dir / "fifo")


def _warm_up(world: World) -> None:
    """Every RPC and subject a few times with valid requests, so that what is allocated once
    (code paths, caches, pools, the log relay) is in the baseline before memory is measured."""
    for _ in range(3):
        for agent_id in (*KNOWN, PROBE):
            for method, request in (
                ("GetAgent", pb.GetAgentRequest(agent_id=agent_id)),
                ("GetAgentStatus", pb.GetAgentStatusRequest(agent_id=agent_id)),
                ("GetAgentMetrics", pb.GetAgentMetricsRequest(agent_id=agent_id)),
                ("GetAgentLogs", pb.GetAgentLogsRequest(agent_id=agent_id, follow=True)),
            ):
                world.invoke(method, request.SerializeToString())
        world.invoke("ListAgents", pb.ListAgentsRequest().SerializeToString())
        world.invoke("WatchEvents", pb.WatchEventsRequest().SerializeToString())
        world.invoke("DiscoverAgents", b"")
        world.invoke("SendCommand", pb.SendCommandRequest(agent_id=PROBE, command="ping").SerializeToString())
        world.invoke("StopAgent", pb.StopAgentRequest(agent_id="known-running").SerializeToString())
        world.invoke("RestartAgent", pb.RestartAgentRequest(agent_id="known-running").SerializeToString())
        world.invoke(
            "CreateAgent",
            pb.CreateAgentRequest(manifest_path=str(world.box.extra_dir / "valid")).SerializeToString(),
        )
        world.invoke("DeleteAgent", pb.DeleteAgentRequest(agent_id="fz-manifest").SerializeToString())
        world.nats.request("agent.manager.query", {"command": "list"}, NATS_TIMEOUT)
        world.nats.publish("agent.status", {"agent_id": "known-running", "status": "running"})
        world.nats.publish("agent.metrics", {"agent_id": "known-running", "metrics": {"n": 1}})
    world.reset()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with sandbox("fuzz") as box:
        _prepare_packages(box)
        box.start()
        # The limit is set on the running daemon (the harness starts it without preexec hooks);
        # nothing has been sent to it yet, and the agents it starts from now on inherit it.
        resource.prlimit(box.daemon.pid, resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        w = World(box)
        for agent_id in KNOWN:
            w.create_known(agent_id)
        box.stub.StartAgent(pb.StartAgentRequest(agent_id=PROBE), timeout=15)
        w.original = w.snapshot()
        _warm_up(w)
        w.assert_healthy("the warm-up")
        w.rss_after_warmup = w.rss()
        yield w


# -- the properties, per RPC and per subject ----------------------------------------------------


def test_every_method_is_fuzzed(world: World) -> None:
    assert set(generated_requests(world.targets)) == set(METHODS)
    assert set(raw_requests(world.targets)) == set(METHODS)


def run_fuzz(
    strategy: st.SearchStrategy[T], check: Callable[[T], None], examples: int, explicit: Sequence[T] = ()
) -> None:
    """check on the explicit values, then on `examples` values drawn from strategy."""

    @fuzz(examples)
    @given(value=strategy.flatmap(shown))
    def fuzz_one(value: Shown[T]) -> None:
        check(value.value)

    for value in reversed(explicit):  # hypothesis runs the last one added first
        fuzz_one = example(value=Shown(value))(fuzz_one)
    fuzz_one()


@pytest.mark.parametrize("method", METHODS)
def test_generated_requests(world: World, method: str) -> None:
    def check(request: Message) -> None:
        try:
            world.check_rpc(method, request.SerializeToString())
        finally:
            world.reset()

    run_fuzz(
        generated_requests(world.targets)[method],
        check,
        GENERATED_EXAMPLES.get(method, 60),
        explicit_requests(world.targets).get(method, []),
    )


@pytest.mark.parametrize("method", METHODS)
def test_mutated_requests(world: World, method: str) -> None:
    def check(payload: bytes) -> None:
        try:
            world.check_rpc(method, payload)
        finally:
            world.reset()

    run_fuzz(
        raw_requests(world.targets)[method],
        check,
        MUTATED_EXAMPLES.get(method, 40),
        explicit_raw_requests(world.targets).get(method, []),
    )


@pytest.mark.parametrize("subject", ["agent.manager.command", "agent.manager.query"])
def test_manager_subjects(world: World, subject: str) -> None:
    def check(payload: bytes) -> None:
        try:
            world.check_manager(subject, payload)
        finally:
            world.reset()

    t = world.targets
    run_fuzz(manager_requests(t.mutable, t.readable), check, 200, explicit_manager_requests(t.mutable))


@pytest.mark.parametrize("subject", ["agent.status", "agent.metrics"])
def test_intake_subjects(world: World, subject: str) -> None:
    def check(payload: bytes) -> None:
        try:
            world.check_intake(subject, payload)
        finally:
            world.forget_reports()

    ids = (*world.targets.mutable, *world.targets.readable)
    if subject == "agent.status":
        run_fuzz(heartbeats(ids), check, 100, explicit_heartbeats(ids))
    else:
        run_fuzz(metrics_reports(ids), check, 100, explicit_metrics_reports(ids))


def test_the_daemon_came_through(world: World) -> None:
    """Last: still serving, every known agent answering, memory bounded, nothing logged."""
    healthy(world.box)
    for agent_id in (*KNOWN, PROBE):
        world.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=agent_id), timeout=5)
    listed = world.nats.request("agent.manager.query", {"command": "list"}, NATS_TIMEOUT)
    assert listed["status"] == "success", listed
    limit = resource.prlimit(world.pid, resource.RLIMIT_AS)
    assert limit == (ADDRESS_SPACE, ADDRESS_SPACE), limit
    growth = world.rss() - world.rss_after_warmup
    assert growth < RSS_GROWTH_LIMIT, (
        f"opmasd's RSS grew {growth >> 20} MiB over the fuzz run (from {world.rss_after_warmup >> 20} MiB)"
    )
    world.assert_healthy("the whole run")
