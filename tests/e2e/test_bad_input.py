"""Bad requests get the right status code, a message that says what is wrong, and the field named
in google.rpc.BadRequest; repeated operations answer sensibly instead of failing."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from opmas.v1 import agents_pb2 as pb
from opmas.v1.agents_pb2_grpc import AgentServiceStub

from .harness import Sandbox, call_error, create, sandbox, sleeper, write_package

pytestmark = pytest.mark.timeout(60)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNKNOWN_ID = "no-such-agent"
BAD_ID = "Not A Valid ID!"


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("bad-input") as b:
        b.start()
        create(b.stub, "known", sleeper())
        yield b


@pytest.fixture
def stub(box: Sandbox) -> AgentServiceStub:
    return box.stub


def _by_id(stub: AgentServiceStub, agent_id: str) -> list[tuple[str, Callable[[], Any]]]:
    """Every RPC that names one agent, as (name, call)."""
    return [
        ("GetAgent", lambda: stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id), timeout=5)),
        (
            "GetAgentStatus",
            lambda: stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id=agent_id), timeout=5),
        ),
        (
            "GetAgentMetrics",
            lambda: stub.GetAgentMetrics(pb.GetAgentMetricsRequest(agent_id=agent_id), timeout=5),
        ),
        ("StartAgent", lambda: stub.StartAgent(pb.StartAgentRequest(agent_id=agent_id), timeout=5)),
        ("StopAgent", lambda: stub.StopAgent(pb.StopAgentRequest(agent_id=agent_id), timeout=5)),
        ("RestartAgent", lambda: stub.RestartAgent(pb.RestartAgentRequest(agent_id=agent_id), timeout=5)),
        ("DeleteAgent", lambda: stub.DeleteAgent(pb.DeleteAgentRequest(agent_id=agent_id), timeout=5)),
        (
            "UpdateAgent",
            lambda: stub.UpdateAgent(
                pb.UpdateAgentRequest(agent_id=agent_id, spec=pb.AgentSpec(description="x")), timeout=5
            ),
        ),
        ("GetAgentLogs", lambda: stub.GetAgentLogs(pb.GetAgentLogsRequest(agent_id=agent_id), timeout=5)),
        (
            "GetAgentLogs(follow)",
            lambda: stub.GetAgentLogs(pb.GetAgentLogsRequest(agent_id=agent_id, follow=True), timeout=5),
        ),
        (
            "SendCommand",
            lambda: stub.SendCommand(pb.SendCommandRequest(agent_id=agent_id, command="status"), timeout=5),
        ),
    ]


# -- unknown and malformed ids ------------------------------------------------------------------


def test_unknown_agent_is_not_found_naming_the_id(stub: AgentServiceStub) -> None:
    for name, call in _by_id(stub, UNKNOWN_ID):
        err = call_error(call)
        assert err.code == grpc.StatusCode.NOT_FOUND, name
        assert UNKNOWN_ID in err.message, (name, err.message)
        assert err.resource_name == UNKNOWN_ID, name


def test_malformed_id_is_invalid_argument_naming_agent_id(stub: AgentServiceStub) -> None:
    for agent_id in (BAD_ID, "", "-leading-dash", "x" * 64, "UPPER"):
        for name, call in _by_id(stub, agent_id):
            err = call_error(call)
            assert err.code == INVALID, (name, agent_id, err)
            assert err.fields == ["agent_id"], (name, agent_id, err)
    err = call_error(lambda: create(stub, BAD_ID, sleeper()))
    assert (err.code, err.fields) == (INVALID, ["agent_id"])
    err = call_error(lambda: list(stub.WatchEvents(pb.WatchEventsRequest(agent_ids=[BAD_ID]), timeout=5)))
    assert (err.code, err.fields) == (INVALID, ["agent_ids"])


# -- bad specs ----------------------------------------------------------------------------------


def _create(stub: AgentServiceStub, spec: pb.AgentSpec, agent_id: str = "") -> Any:
    return lambda: stub.CreateAgent(pb.CreateAgentRequest(agent_id=agent_id, spec=spec), timeout=5)


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (pb.AgentSpec(name="", command=sleeper()), "spec.name", "empty"),
        (pb.AgentSpec(name="   ", command=sleeper()), "spec.name", "empty"),
        (pb.AgentSpec(name="no-command"), "spec.command", "program"),
        (pb.AgentSpec(name="missing", command=["/no/such/program"]), "spec.command", "/no/such/program"),
        (pb.AgentSpec(name="missing", command=["no-such-program-on-path"]), "spec.command", "does not exist"),
        (pb.AgentSpec(name="not-exec", command=["{extra}/data.txt"]), "spec.command", "data.txt"),
        (
            pb.AgentSpec(name="neg", command=sleeper(), stop_timeout=duration_pb2.Duration(seconds=-1)),
            "spec.stop_timeout",
            "negative",
        ),
        (
            pb.AgentSpec(name="neg", command=sleeper(), heartbeat_interval=duration_pb2.Duration(nanos=-5)),
            "spec.heartbeat_interval",
            "negative",
        ),
        (pb.AgentSpec(name="pol", command=sleeper(), restart_policy=42), "spec.restart_policy", "42"),  # type: ignore[arg-type]
        (pb.AgentSpec(name="rt", command=sleeper(), runtime=7), "spec.runtime", "7"),  # type: ignore[arg-type]
        (
            pb.AgentSpec(name="env", command=sleeper(), environment={"BAD NAME": "x"}),
            "spec.environment",
            "BAD NAME",
        ),
        (
            pb.AgentSpec(name="wd", command=sleeper(), working_directory="relative/dir"),
            "spec.working_directory",
            "absolute",
        ),
        (
            pb.AgentSpec(name="wd", command=sleeper(), working_directory="/no/such/dir"),
            "spec.working_directory",
            "/no/such/dir",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("spec.") else "",
)
def test_bad_spec_is_invalid_argument_naming_the_field(
    box: Sandbox, stub: AgentServiceStub, spec: pb.AgentSpec, field: str, words: str
) -> None:
    if spec.command and spec.command[0].startswith("{extra}"):
        data = box.extra_dir / "data.txt"
        data.write_text("not a program\n")
        data.chmod(0o644)
        spec.command[0] = str(data)
    err = call_error(_create(stub, spec, "bad-spec"))
    assert err.code == INVALID, err
    assert field in err.fields, err
    assert words in err.descriptions[err.fields.index(field)], err
    # Nothing was registered.
    assert call_error(lambda: stub.GetAgent(pb.GetAgentRequest(agent_id="bad-spec"))).code == (
        grpc.StatusCode.NOT_FOUND
    )


def test_every_violation_is_reported_at_once(stub: AgentServiceStub) -> None:
    spec = pb.AgentSpec(name="", command=["/no/such/program"], stop_timeout=duration_pb2.Duration(seconds=-3))
    err = call_error(_create(stub, spec, "many"))
    assert err.code == INVALID
    assert set(err.fields) == {"spec.name", "spec.command", "spec.stop_timeout"}


def test_create_without_spec_or_manifest(stub: AgentServiceStub) -> None:
    err = call_error(lambda: stub.CreateAgent(pb.CreateAgentRequest(agent_id="nothing"), timeout=5))
    assert (err.code, err.fields) == (INVALID, ["spec"])


def test_update_with_bad_values_or_mask(stub: AgentServiceStub) -> None:
    def update(spec: pb.AgentSpec, paths: list[str] | None = None) -> Callable[[], Any]:
        mask = field_mask_pb2.FieldMask(paths=paths or [])
        return lambda: stub.UpdateAgent(
            pb.UpdateAgentRequest(agent_id="known", spec=spec, update_mask=mask), timeout=5
        )

    cases = [
        (update(pb.AgentSpec(), ["colour"]), "update_mask"),
        (update(pb.AgentSpec(), ["name"]), "spec.name"),  # the mask clears the name
        (update(pb.AgentSpec(stop_timeout=duration_pb2.Duration(seconds=-1))), "spec.stop_timeout"),
        (update(pb.AgentSpec(restart_policy=9)), "spec.restart_policy"),  # type: ignore[arg-type]
        (update(pb.AgentSpec(command=["/no/such/program"])), "spec.command"),
        (update(pb.AgentSpec()), "update_mask"),  # nothing to change
    ]
    for call, field in cases:
        err = call_error(call)
        assert err.code == INVALID, (field, err)
        assert field in err.fields, (field, err)
    # None of it changed the agent.
    agent = stub.GetAgent(pb.GetAgentRequest(agent_id="known"), timeout=5)
    assert agent.spec.name == "known"
    assert list(agent.spec.command) == sleeper()


# -- other bad arguments ------------------------------------------------------------------------


def test_negative_stop_timeout_and_tail(stub: AgentServiceStub) -> None:
    err = call_error(
        lambda: stub.StopAgent(
            pb.StopAgentRequest(agent_id="known", timeout=duration_pb2.Duration(seconds=-1)), timeout=5
        )
    )
    assert (err.code, err.fields) == (INVALID, ["timeout"])
    err = call_error(
        lambda: stub.GetAgentLogs(pb.GetAgentLogsRequest(agent_id="known", tail_lines=-1), timeout=5)
    )
    assert (err.code, err.fields) == (INVALID, ["tail_lines"])


def test_bad_command_arguments(stub: AgentServiceStub) -> None:
    err = call_error(
        lambda: stub.SendCommand(pb.SendCommandRequest(agent_id="known", command=" "), timeout=5)
    )
    assert (err.code, err.fields) == (INVALID, ["command"])
    for timeout in (duration_pb2.Duration(seconds=-1), duration_pb2.Duration(seconds=100_000)):
        request = pb.SendCommandRequest(agent_id="known", command="status", timeout=timeout)
        err = call_error(functools.partial(stub.SendCommand, request, timeout=5))
        assert (err.code, err.fields) == (INVALID, ["timeout"]), err


def test_bad_list_arguments(stub: AgentServiceStub) -> None:
    cases = [
        (pb.ListAgentsRequest(page_size=-1), "page_size"),
        (pb.ListAgentsRequest(page_token="not-a-token"), "page_token"),
        (pb.ListAgentsRequest(state=99), "state"),  # type: ignore[arg-type]
    ]
    for request, field in cases:
        err = call_error(functools.partial(stub.ListAgents, request, timeout=5))
        assert (err.code, err.fields) == (INVALID, [field]), err


# -- manifests ----------------------------------------------------------------------------------


def test_bad_manifest_paths(box: Sandbox, stub: AgentServiceStub) -> None:
    missing_program = write_package(
        box.extra_dir, "missing-program", {"name": "missing-program", "entrypoint": "/no/such/agent --run"}
    )
    broken_yaml = write_package(box.extra_dir, "broken-yaml", "name: x\nentrypoint: [unclosed\n")
    bad_policy = write_package(
        box.extra_dir,
        "bad-policy",
        {"name": "bad-policy", "entrypoint": sleeper(), "restart_policy": "sometimes"},
    )
    negative = write_package(
        box.extra_dir, "negative", {"name": "negative", "entrypoint": sleeper(), "stop_timeout": "-5s"}
    )
    cases = [
        (missing_program, "/no/such/agent"),
        (broken_yaml, "invalid YAML"),
        (bad_policy, "sometimes"),
        (negative, "stop_timeout"),
        (box.extra_dir / "no-such-package", "cannot read"),
    ]
    for path, words in cases:
        request = pb.CreateAgentRequest(manifest_path=str(path))
        err = call_error(functools.partial(stub.CreateAgent, request, timeout=5))
        assert (err.code, err.fields) == (INVALID, ["manifest_path"]), (path, err)
        assert words in err.message, (path, err.message)
    err = call_error(
        lambda: stub.CreateAgent(pb.CreateAgentRequest(manifest_path="relative/agent.yaml"), timeout=5)
    )
    assert (err.code, err.fields) == (INVALID, ["manifest_path"])
    assert "absolute" in err.message


def test_discover_lists_a_manifest_with_yaml_errors(box: Sandbox, stub: AgentServiceStub) -> None:
    broken = write_package(box.agents_dir, "yaml-error", "name: broken\n  entrypoint: : [\n")
    try:
        report = stub.DiscoverAgents(pb.DiscoverAgentsRequest(), timeout=10)
        errors = {e.manifest_path: e.message for e in report.errors}
        message = errors[str(broken / "agent.yaml")]
        assert "invalid YAML" in message and "line" in message, message
        assert "broken" not in {a.agent_id for a in report.agents}
        # The daemon is unharmed.
        assert stub.GetAgent(pb.GetAgentRequest(agent_id="known"), timeout=5).agent_id == "known"
    finally:
        (broken / "agent.yaml").unlink()
        broken.rmdir()


# -- repeated operations ------------------------------------------------------------------------


def test_repeated_operations_answer_sensibly(box: Sandbox, stub: AgentServiceStub) -> None:
    create(stub, "twice", sleeper())
    err = call_error(lambda: create(stub, "twice", sleeper()))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert "twice" in err.message and err.resource_name == "twice"

    first = stub.StartAgent(pb.StartAgentRequest(agent_id="twice"), timeout=10)
    second = stub.StartAgent(pb.StartAgentRequest(agent_id="twice"), timeout=10)
    assert first.changed and not second.changed
    assert second.status.pid == first.status.pid
    assert box.agent_pids("twice") == [first.status.pid]

    assert stub.StopAgent(pb.StopAgentRequest(agent_id="twice"), timeout=10).changed
    assert not stub.StopAgent(pb.StopAgentRequest(agent_id="twice"), timeout=10).changed

    assert stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="twice"), timeout=10).deleted
    again = stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="twice"), timeout=10)
    assert not again.deleted and again.agent_id == "twice"
    # A deleted agent is not found by the other calls.
    for name, call in _by_id(stub, "twice"):
        if name == "DeleteAgent":
            continue
        assert call_error(call).code == grpc.StatusCode.NOT_FOUND, name


def test_a_failing_start_reports_why(box: Sandbox, stub: AgentServiceStub) -> None:
    """A program that passed validation but cannot start (removed since) fails the start."""
    program = box.extra_dir / "vanishing.sh"
    program.write_text("#!/bin/sh\nexec sleep 1000\n")
    program.chmod(0o755)
    create(stub, "vanishing", [str(program)])
    program.unlink()
    try:
        err = call_error(lambda: stub.StartAgent(pb.StartAgentRequest(agent_id="vanishing"), timeout=10))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "vanishing" in err.message and "not found" in err.message, err.message
        status = stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id="vanishing"), timeout=5)
        assert status.state == pb.AGENT_STATE_ERROR
        assert "failed to start" in status.state_reason
        assert box.agent_pids("vanishing") == []
    finally:
        stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="vanishing"), timeout=10)


def test_values_too_long_for_the_store_are_refused_alike_on_both_stores_and_hang_nothing(
    make_sandbox: Callable[..., Sandbox], backend: str
) -> None:
    box = make_sandbox(f"bounded-{backend}", backend=backend)
    box.start()
    for field, value in (
        ("type", "t" * 300),
        ("version", "v" * 300),
        ("description", "d" * 5000),
        ("type", "a\0b"),
    ):
        spec = pb.AgentSpec(name="bounded", command=sleeper(), **{field: value})
        request = pb.CreateAgentRequest(agent_id="bounded", spec=spec)
        error = call_error(lambda request=request: box.stub.CreateAgent(request, timeout=5))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.fields == [f"spec.{field}"], error
    # Nothing was poisoned: the next change is answered at once, and stored.
    create(box.stub, "after", sleeper())
    assert box.sql("SELECT agent_id FROM agents") == [("after",)]


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
        b"\x0a\x02\xff\xfe",  # agent_id that is not UTF-8
        b"\xff",  # not a tag at all
    ],
)
def test_a_request_that_cannot_be_decoded_is_invalid_argument_not_unknown(
    box: Sandbox, payload: bytes
) -> None:
    channel = box.daemon.channel()
    call = channel.unary_unary(
        "/opmas.v1.AgentService/GetAgent", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(payload, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    assert "not a valid message" in (raised.value.details() or "")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_params_nested_past_protobufs_limit_are_invalid_argument(box: Sandbox) -> None:
    # Built by hand: the Python protobuf library refuses to build a Struct this deep itself.
    value = b"\x11" + struct.pack("<d", 1.0)  # Value.number_value
    params = b""
    for _ in range(120):
        params = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields["a"] = value
        value = _field(5, params)  # Value.struct_value
    request = _field(1, b"nobody") + _field(2, b"ping") + _field(3, params)
    channel = box.daemon.channel()
    call = channel.unary_unary(
        "/opmas.v1.AgentService/SendCommand", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
