"""The committed stubs match the .proto, and the contract has the REST paths of DESIGN §3."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2

from opmas.v1 import agents_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("agents_pb2.py", "agents_pb2.pyi", "agents_pb2_grpc.py", "agents_pb2_grpc.pyi")


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    _generator().generate(tmp_path)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "opmas" / "v1" / name).read_text() != (ROOT / "opmas" / "v1" / name).read_text()
    ]
    assert not stale, f"stubs out of date with proto/opmas/v1: {stale}; run `make proto` and commit"


EXPECTED_HTTP = {
    "ListAgents": ("get", "/api/v1/agents", ""),
    "CreateAgent": ("post", "/api/v1/agents", "*"),
    "GetAgent": ("get", "/api/v1/agents/{agent_id}", ""),
    "UpdateAgent": ("put", "/api/v1/agents/{agent_id}", "*"),
    "DeleteAgent": ("delete", "/api/v1/agents/{agent_id}", ""),
    "StartAgent": ("post", "/api/v1/agents/{agent_id}/start", "*"),
    "StopAgent": ("post", "/api/v1/agents/{agent_id}/stop", "*"),
    "RestartAgent": ("post", "/api/v1/agents/{agent_id}/restart", "*"),
    "GetAgentStatus": ("get", "/api/v1/agents/{agent_id}/status", ""),
    "GetAgentMetrics": ("get", "/api/v1/agents/{agent_id}/metrics", ""),
    "GetAgentLogs": ("get", "/api/v1/agents/{agent_id}/logs", ""),
    "WatchEvents": ("get", "/api/v1/events", ""),
    "DiscoverAgents": ("post", "/api/v1/agents:discover", "*"),
    "SendCommand": ("post", "/api/v1/agents/{agent_id}/command", "*"),
}


@pytest.mark.parametrize("method", sorted(EXPECTED_HTTP))
def test_rest_mapping(method: str) -> None:
    service = agents_pb2.DESCRIPTOR.services_by_name["AgentService"]
    rule = service.methods_by_name[method].GetOptions().Extensions[annotations_pb2.http]
    verb = rule.WhichOneof("pattern")
    assert (verb, getattr(rule, verb), rule.body) == EXPECTED_HTTP[method]


def test_every_rpc_is_mapped() -> None:
    service = agents_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert set(service.methods_by_name) == set(EXPECTED_HTTP)


def test_stubs_import_without_the_daemon() -> None:
    # A client needs only `opmas.v1` and its runtime dependencies, not the daemon's code.
    code = "import sys, opmas.v1.agents_pb2_grpc; sys.exit('opmasd' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
