"""Hostile input to the bulk API and opmasctl (labels, selectors, bulk operations, flags):
each bad input gets a clear error naming what was wrong, never a wedge, a gRPC transport
error or a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from opmas.v1 import agents_pb2 as pb

from .harness import Sandbox, call_error, sandbox, sleeper

pytestmark = pytest.mark.timeout(90)

# A year: far beyond the day a spec's stop_timeout may be.
YEAR_SECONDS = 365 * 86400


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("attack-issue13") as b:
        b.start()
        yield b


def create(box: Sandbox, agent_id: str, start: bool = False) -> None:
    spec = pb.AgentSpec(name=agent_id, command=sleeper())
    spec.start_seconds.FromSeconds(0)
    box.stub.CreateAgent(pb.CreateAgentRequest(agent_id=agent_id, spec=spec, start=start), timeout=20)


def test_stop_grace_is_bounded_as_stop_timeout_is(box: Sandbox) -> None:
    """A stop's timeout (grace before SIGKILL) of years would hold the agent's lock that long:
    every later stop, restart or delete of it (and any bulk operation that includes it, with
    the locks of the agents before it in id order) would hang. It must be refused like a
    spec's stop_timeout past a day."""
    create(box, "grace-single", start=True)
    create(box, "grace-bulk", start=True)

    single = pb.StopAgentRequest(agent_id="grace-single")
    single.timeout.FromSeconds(YEAR_SECONDS)
    bad = call_error(lambda: box.stub.StopAgent(single, timeout=20))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT, (bad.code, bad.message)
    assert "timeout" in bad.message

    bulk = pb.StopAgentsRequest(agent_ids=["grace-bulk"])
    bulk.timeout.FromSeconds(YEAR_SECONDS)
    bad = call_error(lambda: box.stub.StopAgents(bulk, timeout=20))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT, (bad.code, bad.message)
    assert "timeout" in bad.message


def test_many_invalid_ids_or_labels_give_invalid_argument_over_grpc(box: Sandbox) -> None:
    """One violation per bad id (or label), all in the status trailers, passed gRPC's 16 KiB
    metadata limit: the client saw RESOURCE_EXHAUSTED 'Stream removed (received metadata size
    exceeds hard limit)' instead of INVALID_ARGUMENT naming the bad value."""
    request = pb.StartAgentsRequest(agent_ids=[f"BAD-{i}" for i in range(100)])
    bad = call_error(lambda: box.stub.StartAgents(request, timeout=20))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT, (bad.code, bad.message[:300])
    assert "BAD-0" in bad.message

    labels = {f"k{i:03d}": "-" * 63 for i in range(64)}
    spec = pb.AgentSpec(name="bad-labels", command=sleeper(), labels=labels)
    create_bad = pb.CreateAgentRequest(agent_id="bad-labels", spec=spec)
    bad = call_error(lambda: box.stub.CreateAgent(create_bad, timeout=20))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT, (bad.code, bad.message[:300])
    assert "spec.labels" in bad.message


def test_opmasctl_logs_tail_out_of_int32_is_a_usage_error(box: Sandbox) -> None:
    create(box, "tail-range")
    result = box.opmasctl("agents", "logs", "tail-range", "--tail", "2147483648")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "--tail" in result.stderr


def test_opmasctl_config_that_is_a_directory_is_skipped(box: Sandbox, tmp_path: Path) -> None:
    """OPMAS_CONFIG naming a folder is 'not a regular file', as /dev/zero is, not a traceback."""
    result = box.opmasctl(
        "--timeout", "3", "agents", "list", server=None, env={"OPMAS_CONFIG": str(tmp_path)}
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 4, (result.returncode, result.stderr)
    assert str(tmp_path) in result.stderr


def test_opmasctl_socket_path_too_long_for_af_unix(box: Sandbox, tmp_path: Path) -> None:
    """A socket path past AF_UNIX's 107 bytes: a clear error (usage, or unreachable with the
    reason), not gRPC's UNKNOWN 'Failed to create channel' and its C-core log lines."""
    long_path = str(tmp_path / ("d" * 120) / "opmasd.sock")
    result = box.opmasctl("--timeout", "3", "agents", "list", server=long_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (2, 4), (result.returncode, result.stderr)
    assert "unknown:" not in result.stderr.lower(), result.stderr
    assert "parse_address.cc" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("agents", "stop", "x", "--grace", "2d"), "invalid grace"),
        (("--timeout", "99999999999999999", "agents", "list"), "invalid timeout"),
        (("agents", "logs", "x", "--since", "2026-12-07T11:00:00+99:00"), "invalid --since"),
        (("agents", "logs", "x", "--since", "2026-12-07T11:00:00"), "needs its offset"),
        (("agents", "logs", "x", "--since", "99999999999d"), "out of range"),
        (("agents", "logs", "x", "--since", "0001-01-01T00:00:00+14:00"), "out of range"),
        (("agents", "update", "x", "--label", "a=1", "--unset-label", "a"), "both name a"),
        (("agents", "update", "x", "--env", "A=1", "--unset-env", "A"), "both name A"),
    ],
)
def test_values_opmasctl_cannot_honour_are_usage_errors(
    box: Sandbox, args: tuple[str, ...], complaint: str
) -> None:
    result = box.opmasctl(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert complaint in result.stderr and "Traceback" not in result.stderr


def test_a_manifest_label_that_yaml_reads_as_no_string_is_refused(box: Sandbox) -> None:
    folder = box.package(
        "yaml-labels", "name: yaml-labels\nentrypoint: [sleep, '1000']\nlabels: {tier: 0x1F}\n"
    )
    bad = call_error(
        lambda: box.stub.CreateAgent(pb.CreateAgentRequest(manifest_path=str(folder)), timeout=20)
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels: the value of 'tier' is 31, not a string; quote it" in bad.message


def test_tls_to_a_plaintext_port_is_one_error_line_not_grpc_core_logs(box: Sandbox) -> None:
    result = box.opmasctl("--timeout", "5", "agents", "list", server=f"https://{box.address}")
    assert result.returncode == 4, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
