"""Socket activation: sd_listen_fds semantics, which passed socket REST takes, and that TLS and
the connection caps hold on an adopted socket (systemd/listen_fds.py, api/rest/server.py)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trustme

from opmas.tlsfiles import read_server_files
from opmasd.api.rest.gateway import RestGateway
from opmasd.api.rest.server import Endpoints, HttpListeners, HttpServer
from opmasd.api.tls import ServerTls
from opmasd.config import ConfigError, RestConfig
from opmasd.systemd.listen_fds import PassedSocket, passed_sockets, rest_socket

ROOT = Path(__file__).resolve().parents[2]

# Run in a child of its own: fd 3 there is the passed socket, as systemd would leave it.
CHILD = """
import fcntl, json, os, socket, sys
from opmasd.systemd.listen_fds import passed_sockets
listening = int(sys.argv[1])
os.dup2(listening, 3, inheritable=True)
os.close(listening)
env = {"LISTEN_FDS": sys.argv[2], "LISTEN_FDNAMES": "rest", "OTHER": "kept"}
env["LISTEN_PID"] = str(os.getpid()) if sys.argv[3] == "own" else str(os.getpid() + 1)
passed = passed_sockets(env)
print(json.dumps({
    "passed": [[p.name, p.sock.fileno(), p.sock.getsockname()[1]] for p in passed],
    "cloexec": bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    "env": sorted(env),
}))
"""


def run_child(count: str, pid: str) -> subprocess.CompletedProcess[str]:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        return subprocess.run(
            [sys.executable, "-c", CHILD, str(listening.fileno()), count, pid],
            pass_fds=[listening.fileno()],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            timeout=60,
        )


def test_the_passed_socket_is_taken_from_fd_3_and_the_variables_are_dropped() -> None:
    result = run_child("1", "own")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert [name for name, _, _ in seen["passed"]] == ["rest"]
    assert seen["passed"][0][1] == 3
    assert seen["cloexec"], "agents would inherit the listening socket"
    assert seen["env"] == ["OTHER"], "agents would inherit LISTEN_*"


def test_sockets_meant_for_another_pid_are_not_taken_but_the_variables_are_dropped() -> None:
    result = run_child("1", "other")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])  # after the warning's log line
    assert seen["passed"] == [] and not seen["cloexec"] and seen["env"] == ["OTHER"]


def test_a_count_past_the_open_fds_is_an_error() -> None:
    result = run_child("2", "own")  # fd 4 is not open in the child
    assert result.returncode != 0
    assert "LISTEN_FDS=2, but fd 4 is not open" in result.stderr


def test_without_the_variables_nothing_is_passed() -> None:
    env = {"PATH": "/bin"}
    assert passed_sockets(env, pid=1) == [] and env == {"PATH": "/bin"}


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def _rest(address: str | None, enabled: bool = True) -> RestConfig:
    return RestConfig(address=address, enabled=enabled)


def test_rest_takes_the_socket_on_its_address(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    passed = [PassedSocket(listening, "rest")]
    assert rest_socket(passed, _rest(f"127.0.0.1:{port}"), "f.yaml") is listening
    assert rest_socket(passed, _rest("127.0.0.1:0"), "f.yaml") is listening  # port 0: any
    assert rest_socket(passed, _rest(f"localhost:{port}"), "f.yaml") is listening  # a name, resolved
    assert rest_socket([], _rest(f"127.0.0.1:{port}"), "f.yaml") is None


@pytest.mark.parametrize(
    ("rest", "field", "reason"),
    [
        (_rest("127.0.0.1:1"), "rest.address", "it is not the configured 127.0.0.1:1"),
        (_rest("127.0.0.2:0"), "rest.address", "it is not the configured 127.0.0.2:0"),
        (_rest(None), "rest.address", "REST's TCP address is off: nothing would serve it"),
        (_rest("127.0.0.1:0", enabled=False), "rest.enabled", "nothing would serve it"),
    ],
)
def test_a_socket_rest_does_not_serve_is_refused(
    listening: socket.socket, rest: RestConfig, field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        rest_socket([PassedSocket(listening, "rest")], rest, "f.yaml")
    assert refused.value.key == field and reason in refused.value.reason
    assert f"127.0.0.1:{listening.getsockname()[1]} (fd {listening.fileno()}, rest)" in refused.value.reason


def test_sockets_of_the_wrong_kind_or_too_many_are_refused(listening: socket.socket) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as unbound:
        udp.bind(("127.0.0.1", 0))
        unbound.bind(("127.0.0.1", 0))
        unix = socket.socket(socket.AF_UNIX)
        cases = {
            "not a stream socket": [PassedSocket(udp, "rest")],
            "not listening": [PassedSocket(unbound, "rest")],
            "not a TCP socket": [PassedSocket(unix, "rest")],
            "only one socket can be passed": [PassedSocket(listening, "a"), PassedSocket(listening, "b")],
        }
        for reason, passed in cases.items():
            with pytest.raises(ConfigError, match=reason):
                rest_socket(passed, _rest("127.0.0.1:0"), "f.yaml")
        unix.close()


async def _serve(listeners: HttpListeners, max_connections: int = 256) -> HttpServer:
    gateway = RestGateway([], cast(Any, None), 1024)
    server = HttpServer(gateway, Endpoints(openapi=dict), listeners, grace=1, max_connections=max_connections)
    await server.start()
    return server


async def _get(port: int, context: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed unanswered, and our request raced the close
        return b""
    finally:
        writer.close()


async def test_rest_serves_tls_on_an_adopted_socket(tmp_path: Path, listening: socket.socket) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    key.chmod(0o600)
    tls = ServerTls(read_server_files(cert, key, None))
    port = listening.getsockname()[1]
    listening.setblocking(False)
    server = await _serve(
        HttpListeners(address=f"127.0.0.1:{port}", ssl_context=tls.rest_context(), passed_socket=listening)
    )
    try:
        assert server.port == port
        client = ssl.create_default_context()
        ca.configure_trust(client)
        assert b'"alive"' in await _get(port, client)
    finally:
        await server.stop()


async def test_the_connection_caps_hold_on_an_adopted_socket(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    listening.setblocking(False)
    server = await _serve(HttpListeners(address=f"127.0.0.1:{port}", passed_socket=listening), 4)
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1)]  # 4 // 4 per host
        await asyncio.sleep(0.05)
        assert await _get(port) == b"", "a host past its share was served"
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)
        assert b'"alive"' in await _get(port)
    finally:
        await server.stop()


def test_the_socket_unit_verifies_and_listens_on_rest_default(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is needed to check systemd/opmasd.socket (apt-get install systemd)")
    unit = (ROOT / "systemd" / "opmasd.socket").read_text()
    assert re.search(r"^ListenStream=(\S+)$", unit, re.M)[1] == RestConfig().address  # type: ignore[index]
    assert re.search(r"^Accept=no$", unit, re.M)
    service = (ROOT / "systemd" / "opmasd.service").read_text()
    (tmp_path / "opmasd.service").write_text(
        re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", service, flags=re.M)
    )
    (tmp_path / "opmasd.socket").write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "opmasd.socket")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "opmasd.socket" not in result.stderr, result.stderr
