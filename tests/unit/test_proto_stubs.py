"""The committed stubs match the .proto, and the contract has the REST paths of DESIGN §3."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

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


def _descriptor_set(root: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString((root / "opmas" / "v1" / "agents.binpb").read_bytes())


def test_committed_descriptor_set_is_fresh(tmp_path: Path) -> None:
    # Compared parsed, not byte for byte. The imported files (google/api, google/protobuf) come
    # from the installed packages: only their names must match, their comments may differ.
    _generator().generate(tmp_path)
    fresh, committed = _descriptor_set(tmp_path), _descriptor_set(ROOT)
    assert [f.name for f in committed.file] == [f.name for f in fresh.file]
    ours = {f.name: f for f in fresh.file if f.name.startswith("opmas/")}
    assert ours, "the descriptor set holds none of proto/opmas"
    stale = [f.name for f in committed.file if f.name in ours and f != ours[f.name]]
    assert not stale, f"opmas/v1/agents.binpb out of date: {stale}; run `make proto` and commit"


def test_descriptor_set_keeps_the_comments() -> None:
    (agents,) = (f for f in _descriptor_set(ROOT).file if f.name == "opmas/v1/agents.proto")
    comments = {tuple(loc.path): loc.leading_comments for loc in agents.source_code_info.location}
    # path [6, 0, 2, 0]: service 0, method 0 (descriptor.proto numbers the fields so)
    assert "Lists agents" in comments.get((6, 0, 2, 0), ""), "generated without --include_source_info?"


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
    "StartAgents": ("post", "/api/v1/agents:start", "*"),
    "StopAgents": ("post", "/api/v1/agents:stop", "*"),
    "RestartAgents": ("post", "/api/v1/agents:restart", "*"),
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
