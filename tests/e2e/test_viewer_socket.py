"""The viewers' socket (grpc.viewer_socket): a second unix socket whose callers are viewers.

Whoever may connect reads (list, get, status, logs) and is refused every change with
PERMISSION_DENIED, sees environment values hidden, and is audited as `local-viewer`; the
daemon lets others through its runtime directory to reach it; `nobody` (outside the sockets'
group) reads through it while the admin socket stays closed to it, and opmasctl finds it
through the daemon's configuration when the admin socket refuses the user.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import agents_pb2_grpc

from .harness import Sandbox, call_error, create, sleeper, wait_for
from .test_auth_local import GRPCURL, SERVICE, as_nobody

pytestmark = pytest.mark.timeout(90)


def viewer_box(make_sandbox: Callable[..., Sandbox]) -> tuple[Sandbox, Path]:
    box = make_sandbox()
    viewer = box.runtime_dir / "viewer.sock"
    box.start(env={"OPMAS_GRPC_VIEWER_SOCKET": str(viewer)})
    create(box.daemon.stub, "watched", sleeper(), environment={"API_KEY": "s3cr3t"})
    box.daemon.stub.StartAgent(pb.StartAgentRequest(agent_id="watched"), timeout=10)
    return box, viewer


def test_callers_on_the_viewer_socket_read_and_change_nothing(make_sandbox: Callable[..., Sandbox]) -> None:
    box, viewer = viewer_box(make_sandbox)
    assert stat.S_IMODE(viewer.stat().st_mode) == 0o666
    assert box.runtime_dir.stat().st_mode & stat.S_IXOTH  # others may pass through to it
    assert not box.runtime_dir.stat().st_mode & stat.S_IROTH  # but not list it
    with grpc.insecure_channel(f"unix://{viewer}") as channel:
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        listed = stub.ListAgents(pb.ListAgentsRequest(), timeout=10)
        assert [a.spec.name for a in listed.agents] == ["watched"]
        assert dict(stub.GetAgent(pb.GetAgentRequest(agent_id="watched"), timeout=10).spec.environment) == {
            "API_KEY": "<hidden>"
        }
        for change in (
            lambda: stub.StopAgent(pb.StopAgentRequest(agent_id="watched"), timeout=10),
            lambda: stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="watched"), timeout=10),
        ):
            error = call_error(change)
            assert error.code == grpc.StatusCode.PERMISSION_DENIED, error
            assert "local-viewer" in error.message
    status = box.daemon.stub.GetAgentStatus(pb.GetAgentStatusRequest(agent_id="watched"), timeout=10)
    assert status.state == pb.AGENT_STATE_RUNNING  # the refused stop did nothing

    def refusal_recorded() -> bool:
        result = box.opmasctl("-o", "json", "audit", "--actor", "local-viewer")
        return result.returncode == 0 and "StopAgent" in result.stdout

    wait_for(refusal_recorded, 10, what="the viewer's refused stop in the audit trail")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a client as nobody")
def test_nobody_reads_through_the_viewer_socket_only(make_sandbox: Callable[..., Sandbox]) -> None:
    box, viewer = viewer_box(make_sandbox)
    if not GRPCURL.is_file():
        pytest.skip(f"no grpcurl binary at {GRPCURL}")
    box.root.chmod(box.root.stat().st_mode | 0o001)  # the sandbox's root, as /run would be
    with tempfile.TemporaryDirectory(prefix="opmas-nobody-") as scratch:
        os.chmod(scratch, 0o755)
        grpcurl = Path(scratch) / "grpcurl"
        shutil.copy(GRPCURL, grpcurl)
        grpcurl.chmod(0o755)

        def call(socket: Path, method: str, body: str = "{}") -> tuple[int, str]:
            done = as_nobody(
                str(grpcurl), "-plaintext", "-unix", "-d", body, str(socket), f"{SERVICE}/{method}"
            )
            return done.returncode, done.stdout + done.stderr

        code, out = call(viewer, "ListAgents")
        assert code == 0 and "watched" in out, out
        code, out = call(viewer, "StopAgent", '{"agent_id": "watched"}')
        assert "PermissionDenied" in out, out
        code, out = call(box.socket, "ListAgents")
        assert code != 0 and "permission denied" in out.lower(), out  # the admin door stays shut
