"""TLS and mTLS on a real opmasd's TCP listeners (gRPC and REST), and their reload on SIGHUP.

The certificates come from throwaway CAs (trustme), written as files the daemon is pointed at
(OPMAS_TLS_CERT, OPMAS_TLS_KEY, OPMAS_TLS_CLIENT_CA). What a user sees is checked: direct gRPC
and HTTPS clients and opmasctl get through with the CA (and, for mTLS, a client certificate of
the client CA) and a token; a plaintext client, an untrusted or missing client certificate do
not; the token still decides the role; a reload switches new connections to new files, and a
broken file at reload keeps the running ones. The unix socket stays plain (the harness's
readiness check uses it).
"""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import agents_pb2_grpc

from .harness import Sandbox, bearer, free_port, sandbox, wait_for
from .rest_client import Rest, rest_env

pytestmark = pytest.mark.timeout(90)

OK = "OK"


class Authority:
    """A throwaway CA and files of certificates it signs, in a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.ca = trustme.CA(organization_name=f"opmas test {name}")
        self.folder = folder
        self.name = name
        self.ca_file = folder / f"{name}-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, cert: Path, key: Path, *names: str) -> None:
        """A certificate for names (a server's: localhost and 127.0.0.1 by default) written to
        cert and key as a renewal would: each file replaced at once, the key 0600."""
        names = names or ("localhost", "127.0.0.1")
        issued = self.ca.issue_cert(*names, organization_name=f"opmas test {self.name}")
        _replace(cert, b"".join(blob.bytes() for blob in issued.cert_chain_pems), 0o644)
        _replace(key, issued.private_key_pem.bytes(), 0o600)

    def client(self, name: str = "client") -> tuple[Path, Path]:
        cert, key = self.folder / f"{self.name}-{name}.pem", self.folder / f"{self.name}-{name}.key"
        self.issue(cert, key, f"{name}@opmas.test")
        return cert, key


def _replace(path: Path, data: bytes, mode: int) -> None:
    scratch = path.with_name(path.name + ".new")
    scratch.write_bytes(data)
    scratch.chmod(mode)
    os.replace(scratch, path)


class Pki:
    """The daemon's files (server.pem, server.key, client-ca.pem) and the CAs behind them."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        self.folder = folder
        self.cert, self.key, self.client_ca = (
            folder / "server.pem",
            folder / "server.key",
            folder / "client-ca.pem",
        )
        self.authority = Authority(folder, "first")
        self.authority.issue(self.cert, self.key)
        self.clients = Authority(folder, "clients")
        _replace(self.client_ca, self.clients.ca_file.read_bytes(), 0o644)

    def env(self, mtls: bool = False) -> dict[str, str]:
        env = {"OPMAS_TLS_CERT": str(self.cert), "OPMAS_TLS_KEY": str(self.key)}
        if mtls:
            env["OPMAS_TLS_CLIENT_CA"] = str(self.client_ca)
        return env


def credentials(authority: Authority, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    """gRPC channel credentials trusting only `authority`, presenting `client` if given."""
    cert, key = (client[0].read_bytes(), client[1].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(authority.ca.cert_pem.bytes(), key, cert)


def list_agents(address: str, creds: grpc.ChannelCredentials | None, token: str | None) -> str:
    """ListAgents on a fresh connection (no subchannel shared with an earlier channel): "OK" or
    the status code's name."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.secure_channel(address, creds, options=options)
        if creds is not None
        else grpc.insecure_channel(address, options=options)
    )
    with channel:
        stub = agents_pb2_grpc.AgentServiceStub(channel)
        try:
            stub.ListAgents(
                pb.ListAgentsRequest(), timeout=10, metadata=tuple(bearer(token)) if token else None
            )
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call)
            return err.code().name
    return OK


def https(authority: Authority, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(authority.ca_file))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def rest_get(port: int, context: ssl.SSLContext | None, path: str, token: str = "") -> int | str:
    """The status of a GET on a fresh connection, or the name of the error that ended it."""
    rest = Rest(f"127.0.0.1:{port}", token=token, ssl_context=context, timeout=10)
    try:
        return rest.get(path).status
    except (OSError, http.client.HTTPException) as err:
        return type(err).__name__
    finally:
        rest.close()


def events(box: Sandbox, name: str) -> list[dict[str, object]]:
    return [e for e in box.daemon.log_events() if e.get("event") == name]


# -- TLS (no client certificates) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Pki]]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    port = free_port()
    with sandbox("tls", env={**rest_env(port), **pki.env()}) as box:
        box.start()
        box.rest_port = port  # type: ignore[attr-defined]
        yield box, pki


def test_grpc_over_tls_takes_a_token_and_refuses_plaintext(tls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = tls_box
    trusted = credentials(pki.authority)
    assert list_agents(box.address, trusted, box.admin_token()) == OK
    # TLS is the transport; the token still decides: none, no entry.
    assert list_agents(box.address, trusted, None) == "UNAUTHENTICATED"
    # A plaintext client gets no answer at all from the TLS port.
    assert list_agents(box.address, None, box.admin_token()) == "UNAVAILABLE"
    # A client that trusts another CA refuses the daemon's certificate.
    assert list_agents(box.address, credentials(Authority(pki.folder, "stranger")), None) == "UNAVAILABLE"
    # What the log says of the certificate: who and until when, never its content.
    started = events(box, "TLS on the TCP listeners")
    assert started and "opmas test first" in str(started[0]["subject"]) and started[0]["expires"], started
    assert "BEGIN" not in box.daemon.stderr_text()


def test_rest_over_https_with_the_ca(tls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = tls_box
    port = int(box.rest_port)  # type: ignore[attr-defined]
    context = https(pki.authority)
    assert rest_get(port, context, "/healthz") == 200
    assert rest_get(port, context, "/api/v1/agents", token=box.admin_token()) == 200
    assert rest_get(port, context, "/api/v1/agents") == 401
    # Plain HTTP on the HTTPS port: the connection ends without an HTTP answer.
    assert rest_get(port, None, "/healthz") in ("RemoteDisconnected", "ConnectionResetError", "BadStatusLine")


def test_opmasctl_over_tls(tls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = tls_box
    ca = str(pki.authority.ca_file)
    for server in (box.address, f"https://{box.address}"):
        listed = box.opmasctl("--ca", ca, "-o", "json", "agents", "list", server=server)
        assert listed.returncode == 0, listed.stderr
    # From $OPMAS_CA, as from the flag.
    listed = box.opmasctl("agents", "list", server=box.address, env={"OPMAS_CA": ca})
    assert listed.returncode == 0, listed.stderr


def test_opmasctl_says_in_one_line_what_to_do_against_a_tls_port(tls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = tls_box
    plain = box.opmasctl("--timeout", "5", "agents", "list", server=box.address)
    assert plain.returncode == 4, plain.stderr
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert f"cannot talk to opmasd at {box.address}: it speaks TLS: use https://{box.address}" in plain.stderr
    # TLS, but this system's CAs do not sign the daemon's certificate.
    untrusted = box.opmasctl("--timeout", "5", "agents", "list", server=f"https://{box.address}")
    assert untrusted.returncode == 4, untrusted.stderr
    assert untrusted.stderr.count("\n") == 1, untrusted.stderr
    assert "its TLS certificate is not trusted" in untrusted.stderr and "--ca FILE" in untrusted.stderr
    # The REST port by mistake: TLS works, but it speaks no gRPC.
    rest = f"127.0.0.1:{box.rest_port}"  # type: ignore[attr-defined]
    wrong = box.opmasctl("--ca", str(pki.authority.ca_file), "--timeout", "5", "agents", "list", server=rest)
    assert wrong.returncode == 4, wrong.stderr
    assert wrong.stderr.count("\n") == 1, wrong.stderr
    assert "does not speak gRPC (no h2 in the handshake): is it the REST port?" in wrong.stderr


# -- mTLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Pki]]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    port = free_port()
    with sandbox("mtls", env={**rest_env(port), **pki.env(mtls=True)}) as box:
        box.start()
        box.rest_port = port  # type: ignore[attr-defined]
        yield box, pki


def test_mtls_grpc_refuses_a_missing_or_foreign_client_certificate(mtls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = mtls_box
    token = box.admin_token()
    assert list_agents(box.address, credentials(pki.authority), token) == "UNAVAILABLE"
    foreign = Authority(pki.folder, "foreign").client()
    assert list_agents(box.address, credentials(pki.authority, foreign), token) == "UNAVAILABLE"
    # A server's certificate of the daemon's own CA is no client certificate of the client CA.
    own = pki.authority.client("own-ca")
    assert list_agents(box.address, credentials(pki.authority, own), token) == "UNAVAILABLE"
    good = pki.clients.client()
    assert list_agents(box.address, credentials(pki.authority, good), token) == OK
    # The certificate lets the connection in; the role is still the token's.
    assert list_agents(box.address, credentials(pki.authority, good), None) == "UNAUTHENTICATED"


def test_mtls_rest_refuses_a_missing_or_foreign_client_certificate(mtls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = mtls_box
    port, token = int(box.rest_port), box.admin_token()  # type: ignore[attr-defined]
    refused = ("RemoteDisconnected", "ConnectionResetError", "SSLError", "SSLEOFError", "BrokenPipeError")
    assert rest_get(port, https(pki.authority), "/api/v1/agents", token) in refused
    foreign = Authority(pki.folder, "foreign-rest").client()
    assert rest_get(port, https(pki.authority, foreign), "/api/v1/agents", token) in refused
    good = pki.clients.client("rest-client")
    assert rest_get(port, https(pki.authority, good), "/api/v1/agents", token) == 200
    assert rest_get(port, https(pki.authority, good), "/api/v1/agents") == 401
    assert rest_get(port, https(pki.authority, good), "/healthz") == 200


def test_opmasctl_with_a_client_certificate(mtls_box: tuple[Sandbox, Pki]) -> None:
    box, pki = mtls_box
    cert, key = pki.clients.client("opmasctl")
    ca = str(pki.authority.ca_file)
    ok = box.opmasctl(
        "--ca", ca, "--cert", str(cert), "--key", str(key), "agents", "list", server=box.address
    )
    assert ok.returncode == 0, ok.stderr
    missing = box.opmasctl("--ca", ca, "--timeout", "5", "agents", "list", server=box.address)
    assert missing.returncode == 4 and missing.stderr.count("\n") == 1, missing.stderr
    assert "asks for a client certificate (mTLS): give --cert FILE and --key FILE" in missing.stderr
    half = box.opmasctl("--ca", ca, "--cert", str(cert), "agents", "list", server=box.address)
    assert half.returncode == 2 and "--cert: a client certificate needs its key" in half.stderr, half.stderr


# -- reload -------------------------------------------------------------------------------------


def _hup_and_wait(box: Sandbox, event: str, before: int) -> dict[str, object]:
    os.kill(box.daemon.pid, signal.SIGHUP)
    found = wait_for(lambda: len(events(box, event)) > before and events(box, event), what=event)
    return found[-1]


def test_sighup_switches_new_connections_to_new_files_and_keeps_them_when_broken(
    make_sandbox: Callable[..., Sandbox], tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    port = free_port()
    box = make_sandbox(env={**rest_env(port), **pki.env(mtls=True)})
    box.start()
    token = box.admin_token()
    old_client = pki.clients.client("old")
    assert list_agents(box.address, credentials(pki.authority, old_client), token) == OK

    # Renewal to a NEW CA, for the server's certificate and for the clients' alike.
    new, new_clients = Authority(pki.folder, "second"), Authority(pki.folder, "second-clients")
    new.issue(pki.cert, pki.key)
    _replace(pki.client_ca, new_clients.ca_file.read_bytes(), 0o644)
    reloaded = _hup_and_wait(box, "TLS certificates reloaded", 0)
    assert "opmas test second" in str(reloaded["subject"]), reloaded
    new_client = new_clients.client()
    assert list_agents(box.address, credentials(new, new_client), token) == OK
    assert rest_get(port, https(new, new_client), "/api/v1/agents", token) == 200
    # Trusting only the old CA, or presenting an old client certificate: refused now.
    assert list_agents(box.address, credentials(pki.authority, old_client), token) == "UNAVAILABLE"
    assert list_agents(box.address, credentials(new, old_client), token) == "UNAVAILABLE"
    assert rest_get(port, https(new, old_client), "/api/v1/agents", token) != 200
    # The reload is not reported as a section that applies only at restart.
    assert not [e for e in events(box, "configuration sections changed that apply only at restart")]

    # A key that does not match the certificate: the reload is refused, the running files serve on.
    _replace(pki.key, Authority(pki.folder, "third").ca.issue_cert("x").private_key_pem.bytes(), 0o600)
    failed = _hup_and_wait(
        box, "configuration reload failed; keeping the running configuration and TLS certificates", 0
    )
    assert "OPMAS_TLS_KEY" in str(failed["error"]) and str(pki.key) in str(failed["error"]), failed
    assert "does not match the certificate" in str(failed["error"]), failed
    assert list_agents(box.address, credentials(new, new_client), token) == OK
    assert rest_get(port, https(new, new_client), "/api/v1/agents", token) == 200
    assert len(events(box, "TLS certificates reloaded")) == 1
    assert "PRIVATE KEY" not in box.daemon.stderr_text()


def test_a_remote_address_with_tls_needs_no_unsafe_key(
    make_sandbox: Callable[..., Sandbox], tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    box = make_sandbox(env=pki.env())
    box.start(env={"OPMAS_GRPC_ADDRESS": f"0.0.0.0:{box.port}"})  # 127.0.0.1 reaches it
    assert list_agents(box.address, credentials(pki.authority), box.admin_token()) == OK


def test_a_key_every_user_may_read_stops_the_start(
    make_sandbox: Callable[..., Sandbox], tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    pki.key.chmod(0o644)
    box = make_sandbox(env=pki.env())
    with pytest.raises(AssertionError, match="exited with status"):
        box.start()
    text = box.daemons[-1].stderr_text()
    assert "OPMAS_TLS_KEY" in text and str(pki.key) in text and "readable by every user" in text, text
    assert "PRIVATE KEY" not in text


def test_tls_turned_on_by_a_reload_waits_for_a_restart(
    make_sandbox: Callable[..., Sandbox], tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    box = make_sandbox()
    box.start()
    box.config_file.write_text(f"tls: {{cert: {pki.cert}, key: {pki.key}}}\n")
    changed = _hup_and_wait(box, "configuration sections changed that apply only at restart", 0)
    assert changed["sections"] == ["tls"], changed
    assert list_agents(box.address, None, box.admin_token()) == OK  # still plaintext
    box.restart()
    assert list_agents(box.address, credentials(pki.authority), box.admin_token()) == OK


def test_stalled_handshakes_are_counted_from_their_accept(tmp_path: Path) -> None:
    """Connections that open and stall in their TLS handshake count against rest.max_connections
    and the host's share of it from their accept: past that share they are closed unread, the
    daemon's open files stay bounded, and another host is still served."""
    import socket

    import psutil

    pki = Pki(tmp_path / "pki")
    port = free_port()
    env = {**rest_env(port, OPMAS_REST_MAX_CONNECTIONS="16"), **pki.env()}
    with sandbox("tls-stall", env=env) as box:
        box.start()
        daemon = psutil.Process(box.daemon.pid)
        before = daemon.num_fds()
        stalled = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, never finished
                stalled.append(sock)
            time.sleep(0.5)
            assert daemon.num_fds() - before <= 16, f"{daemon.num_fds() - before} more files open"
            served = 0
            for sock in stalled:
                sock.settimeout(0.05)
                try:
                    served += sock.recv(1) != b""
                except TimeoutError:
                    served += 1  # still open: in its handshake
                except ConnectionResetError:
                    pass
            assert served <= 4, f"{served} of one host's stalled handshakes held (its share: 4)"
            other = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            tls = https(pki.authority).wrap_socket(other, server_hostname="127.0.0.1")
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200"), "another host was not served"
            tls.close()
        finally:
            for sock in stalled:
                sock.close()
