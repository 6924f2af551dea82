"""`--server https://host:port` speaks TLS, checked against the system's CA certificates
($SSL_CERT_FILE here), and `http://` speaks plaintext: against a real grpc server with TLS."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl.cli import run


class Lister(agents_pb2_grpc.AgentServiceServicer):
    def ListAgents(self, request: Any, context: grpc.ServicerContext) -> agents_pb2.ListAgentsResponse:
        return agents_pb2.ListAgentsResponse(agents=[agents_pb2.Agent(agent_id="over-tls")], total_size=1)


def _certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    key, cert = _certificate(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agents_pb2_grpc.add_AgentServiceServicer_to_server(Lister(), server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port, cert
    server.stop(None)


def test_https_is_tls_checked_against_the_system_roots(
    tls_server: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port, cert = tls_server
    # Trusted (the certificate is "the system's" roots): the list comes through.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert run(["--server", f"https://localhost:{port}", "-o", "json", "agents", "list"]) == 0
    assert [a["agentId"] for a in json.loads(capsys.readouterr().out)["agents"]] == ["over-tls"]

    # http:// is plaintext: a TLS server does not take it.
    assert run(["--server", f"http://localhost:{port}", "--timeout", "5", "agents", "list"]) == 4
    assert "unavailable" in capsys.readouterr().err

    # Not trusted: the certificate is refused, nothing is listed.
    monkeypatch.setenv("SSL_CERT_FILE", "/dev/null")
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")
    assert run(["--server", f"https://localhost:{port}", "--timeout", "5", "agents", "list"]) == 4
    captured = capsys.readouterr()
    assert captured.out == "" and "unavailable" in captured.err
