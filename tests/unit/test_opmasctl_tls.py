"""opmasctl over TLS, against real grpc servers with TLS and mTLS on a free port.

`--server https://host:port` speaks TLS, checked against the system's CA certificates
($SSL_CERT_FILE here), and `http://` speaks plaintext. --ca/--cert/--key ($OPMAS_CA, ..., `ca:`,
... in the user's file, relative to its folder) give the CA and the client certificate, and make
a host:port server TLS. A file that cannot be used is a usage error naming the setting and the
file, never its content; a handshake that fails is one line that says why.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl.cli import run
from opmasctl.connection import find_daemon


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

    # http:// is plaintext: a TLS server does not take it, and opmasctl says what to use.
    assert run(["--server", f"http://localhost:{port}", "--timeout", "5", "agents", "list"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"it speaks TLS: use https://localhost:{port}" in err, err

    # Not trusted: the certificate is refused, nothing is listed.
    monkeypatch.setenv("SSL_CERT_FILE", "/dev/null")
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")
    assert run(["--server", f"https://localhost:{port}", "--timeout", "5", "agents", "list"]) == 4
    captured = capsys.readouterr()
    assert captured.out == "" and "its TLS certificate is not trusted" in captured.err
    assert "--ca FILE" in captured.err and captured.err.count("\n") == 1, captured.err


# -- --ca, --cert, --key --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No TLS setting, token or server from the caller's environment; the user's file under
    tmp_path."""
    for name in ("OPMAS_CA", "OPMAS_CERT", "OPMAS_KEY", "OPMAS_TOKEN", "OPMAS_SERVER", "OPMAS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


class Pki:
    """A CA for the server, one for its clients, and their files in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca, self.clients = trustme.CA(), trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.cert, self.key = self.client(self.clients, "client")

    def client(self, ca: trustme.CA, name: str) -> tuple[Path, Path]:
        issued = ca.issue_cert(f"{name}@opmas.test")
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        key.chmod(0o600)
        return cert, key

    def serve(self, mtls: bool, *names: str) -> tuple[grpc.Server, int]:
        """A server with a certificate for names (default: localhost and 127.0.0.1)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        agents_pb2_grpc.add_AgentServiceServicer_to_server(Lister(), server)
        leaf = self.ca.issue_cert(*names) if names else self.server
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        credentials = grpc.ssl_server_credentials(
            [(leaf.private_key_pem.bytes(), chain)],
            root_certificates=self.clients.cert_pem.bytes() if mtls else None,
            require_client_auth=mtls,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        return server, port


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def mtls_port(pki: Pki) -> Iterator[int]:
    server, port = pki.serve(mtls=True)
    yield port
    server.stop(None)


def listed(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [agent["agentId"] for agent in json.loads(capsys.readouterr().out)["agents"]]


def test_ca_makes_host_port_tls_and_is_checked(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    server, port = pki.serve(mtls=False)
    try:
        assert (
            run(["--server", f"127.0.0.1:{port}", "--ca", str(pki.ca_file), "-o", "json", "agents", "list"])
            == 0
        )
        assert listed(capsys) == ["over-tls"]
        other = pki.folder / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        assert (
            run(["--server", f"127.0.0.1:{port}", "--ca", str(other), "--timeout", "5", "agents", "list"])
            == 4
        )
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and f"its TLS certificate is not trusted by the CA from --ca ({other})" in err
        )
    finally:
        server.stop(None)
    # A certificate of another name.
    server, port = pki.serve(False, "other.example")
    try:
        assert (
            run(
                [
                    "--server",
                    f"127.0.0.1:{port}",
                    "--ca",
                    str(pki.ca_file),
                    "--timeout",
                    "5",
                    "agents",
                    "list",
                ]
            )
            == 4
        )
        assert "its TLS certificate does not name 127.0.0.1" in capsys.readouterr().err
    finally:
        server.stop(None)


def test_mtls_with_a_client_certificate_from_flags_environment_or_file(
    pki: Pki,
    mtls_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    server = f"127.0.0.1:{mtls_port}"
    flags = ["--ca", str(pki.ca_file), "--cert", str(pki.cert), "--key", str(pki.key)]
    assert run(["--server", server, *flags, "-o", "json", "agents", "list"]) == 0
    assert listed(capsys) == ["over-tls"]

    monkeypatch.setenv("OPMAS_CA", str(pki.ca_file))
    monkeypatch.setenv("OPMAS_CERT", str(pki.cert))
    monkeypatch.setenv("OPMAS_KEY", str(pki.key))
    assert run(["--server", server, "-o", "json", "agents", "list"]) == 0
    assert listed(capsys) == ["over-tls"]
    for name in ("OPMAS_CA", "OPMAS_CERT", "OPMAS_KEY"):
        monkeypatch.delenv(name)

    # The user's file, with paths relative to its folder.
    folder = tmp_path / "config" / "opmas"
    folder.mkdir(parents=True)
    for source in (pki.ca_file, pki.cert, pki.key):
        (folder / source.name).write_bytes(source.read_bytes())
        (folder / source.name).chmod(0o600)
    user_file = folder / "opmasctl.yaml"
    user_file.write_text(f"server: {server}\nca: ca.pem\ncert: client.pem\nkey: client.key\n")
    user_file.chmod(0o600)
    assert run(["-o", "json", "agents", "list"]) == 0
    assert listed(capsys) == ["over-tls"]


def test_mtls_without_or_with_a_foreign_client_certificate_is_one_clear_line(
    pki: Pki, mtls_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"127.0.0.1:{mtls_port}"
    assert run(["--server", server, "--ca", str(pki.ca_file), "--timeout", "5", "agents", "list"]) == 4
    err = capsys.readouterr().err
    assert err == (
        f"error: cannot talk to opmasd at {server}: it closed the connection in the TLS handshake: it asks "
        "for a client certificate (mTLS): give --cert FILE and --key FILE\n"
    )
    cert, key = pki.client(pki.ca, "foreign")  # signed by the server's CA, not the client CA
    flags = ["--ca", str(pki.ca_file), "--cert", str(cert), "--key", str(key)]
    assert run(["--server", server, *flags, "--timeout", "5", "agents", "list"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not accept the client certificate from --cert" in err, err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--cert", "{cert}"], "--cert: a client certificate needs its key: give --key too"),
        (["--key", "{key}"], "--key: a client key needs its certificate: give --cert too"),
        (["--ca", "{folder}/missing.pem"], "--ca: {folder}/missing.pem: no such file"),
        (["--ca", "{key}"], "--ca: {key}: holds no certificate that can be read"),
        (["--cert", "{cert}", "--key", "{ca}"], "--key: {ca}: a private key readable by every user"),
        (
            ["--cert", "{ca}", "--key", "{key}"],
            "--key: {key}: the key does not match the certificate in {ca}",
        ),
        (["--cert", "{key}", "--key", "{key}"], "--cert: {key}: holds no certificate that can be read"),
    ],
)
def test_a_tls_file_that_cannot_be_used_is_a_usage_error_naming_it(
    pki: Pki, mtls_port: int, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    names = {"cert": pki.cert, "key": pki.key, "ca": pki.ca_file, "folder": pki.folder}
    pki.ca_file.chmod(0o644)
    given = [arg.format(**names) for arg in args]
    assert run(["--server", f"127.0.0.1:{mtls_port}", *given, "agents", "list"]) == 2
    err = capsys.readouterr().err
    assert says.format(**names) in err, err
    assert "PRIVATE KEY" not in err and "CERTIFICATE-----" not in err


@pytest.mark.parametrize(
    ("server", "says"),
    [
        (
            "http://127.0.0.1:9",
            "--ca: http://127.0.0.1:9 says plaintext; use https:// (or host:port) for TLS",
        ),
        ("/run/none/opmasd.sock", "--ca: TLS is for a TCP server; /run/none/opmasd.sock is a unix socket"),
    ],
)
def test_tls_flags_where_tls_makes_no_sense_are_refused(
    pki: Pki, server: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["--server", server, "--ca", str(pki.ca_file), "agents", "list"]) == 2
    assert says in capsys.readouterr().err


def test_a_daemon_configured_with_tls_is_dialled_over_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "opmasd.yaml"
    monkeypatch.setenv("OPMAS_CONFIG", str(config))
    config.write_text("grpc: {address: '0.0.0.0:50443', socket: none}\ntls: {cert: c.pem, key: k.pem}\n")
    first = find_daemon(None, euid=0).candidates[0].endpoint
    assert (first.target, first.display, first.secure) == ("127.0.0.1:50443", "https://127.0.0.1:50443", True)
    # No address given: the default one, with TLS.
    config.write_text("grpc: {socket: none}\ntls: {cert: c.pem, key: k.pem}\n")
    first = find_daemon(None, euid=0).candidates[0].endpoint
    assert (first.target, first.secure) == ("127.0.0.1:50051", True)
    config.write_text("grpc: {address: '127.0.0.1:50443', socket: none}\n")
    assert not find_daemon(None, euid=0).candidates[0].endpoint.secure
