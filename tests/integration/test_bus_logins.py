"""NatsBus logging in to a real external nats-server every way nats.* offers.

Token, NKey seed, creds file (a JWT issued under an operator, as `nsc` makes them), and TLS
with the server's own CA (nats.tls_ca) and a client certificate (nats.tls_cert/tls_key) for
a server that verifies clients. Each: the right login connects and delivers a heartbeat, a
wrong one leaves the bus disconnected (and retrying) without an error escaping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
import pytest
import trustme

from opmasd.bus.connection import NatsBus
from opmasd.bus.embedded import find_binary
from opmasd.bus.login import NatsLogin
from opmasd.bus.subjects import Subjects
from opmasd.core.messages import Heartbeat
from tests.integration.test_bus_secured import free_port, wait_listening


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]


def serve(tmp_path: Path, conf: str) -> Iterator[int]:
    port = free_port()
    path = tmp_path / "server.conf"
    path.write_text(f"listen: 127.0.0.1:{port}\n{conf}\n")
    proc = subprocess.Popen([str(find_binary()), "-c", str(path)], stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def connects(url: str, login: NatsLogin, *, expect: bool) -> NatsBus:
    bus = await NatsBus.connect(url, login=login, subjects=Subjects("sec"), initial_wait=3 if expect else 1)
    if bus.is_connected != expect:
        await bus.close(timeout=1)
        raise AssertionError(f"connected={bus.is_connected}, expected {expect}")
    return bus


async def round_trip(bus: NatsBus) -> Heartbeat:
    """A heartbeat published on the bus's own connection comes back through its intake."""
    got: asyncio.Queue[Heartbeat] = asyncio.Queue()
    bus.set_handlers(got.put_nowait, lambda report: None)
    payload = json.dumps({"agent_id": "a1", "status": "running"}).encode()
    await bus._nc.publish("sec.status", payload)  # the bus's own login publishes too
    return await asyncio.wait_for(got.get(), 5)


# -- token ------------------------------------------------------------------------------------


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[int]:
    yield from serve(tmp_path, 'authorization { token: "t0ken-s3cret" }')


async def test_token_login(token_server: int) -> None:
    url = f"nats://127.0.0.1:{token_server}"
    bus = await connects(url, NatsLogin(token="t0ken-s3cret"), expect=True)
    try:
        assert (await round_trip(bus)).agent_id == "a1"
    finally:
        await bus.close()
    bus = await connects(url, NatsLogin(token="wrong"), expect=False)
    await bus.close(timeout=1)


# -- NKey seed --------------------------------------------------------------------------------


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


@pytest.fixture
def nkey_user(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    user = new_key(nkeys.PREFIX_BYTE_USER)
    seed = tmp_path / "user.nk"
    seed.write_bytes(user.seed + b"\n")
    seed.chmod(0o600)
    for port in serve(tmp_path, f'authorization {{ users = [ {{ nkey: "{user.public_key.decode()}" }} ] }}'):
        yield port, seed


async def test_nkey_seed_login(nkey_user: tuple[int, Path], tmp_path: Path) -> None:
    port, seed = nkey_user
    url = f"nats://127.0.0.1:{port}"
    bus = await connects(url, NatsLogin(nkey_seed_file=seed), expect=True)
    try:
        assert (await round_trip(bus)).agent_id == "a1"
    finally:
        await bus.close()
    other = tmp_path / "other.nk"
    other.write_bytes(new_key(nkeys.PREFIX_BYTE_USER).seed)
    bus = await connects(url, NatsLogin(nkey_seed_file=other), expect=False)
    await bus.close(timeout=1)


# -- creds file (decentralized JWT) -----------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(issuer: nkeys.KeyPair, subject: bytes, nats_claims: dict[str, object]) -> str:
    """A NATS JWT (ed25519-nkey), the shape `nsc` issues."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": _b64(os.urandom(16)),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject.decode(),
        "name": "test",
        "nats": {**nats_claims, "version": 2},
    }
    body = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def creds_file(path: Path, user_jwt: str, seed: bytes) -> Path:
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def operator_server(tmp_path: Path) -> Iterator[tuple[int, nkeys.KeyPair]]:
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1}
    account_jwt = jwt(
        operator, account.public_key, {"type": "account", "limits": {**unlimited, "wildcards": True}}
    )
    conf = (
        f'operator: "{jwt(operator, operator.public_key, {"type": "operator"})}"\n'
        "resolver: MEMORY\n"
        f'resolver_preload: {{ {account.public_key.decode()}: "{account_jwt}" }}\n'
    )
    for port in serve(tmp_path, conf):
        yield port, account


async def test_creds_file_login(operator_server: tuple[int, nkeys.KeyPair], tmp_path: Path) -> None:
    port, account = operator_server
    url = f"nats://127.0.0.1:{port}"
    user = new_key(nkeys.PREFIX_BYTE_USER)
    claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    good = creds_file(tmp_path / "good.creds", jwt(account, user.public_key, claims), user.seed)
    bus = await connects(url, NatsLogin(creds_file=good), expect=True)
    try:
        assert (await round_trip(bus)).agent_id == "a1"
    finally:
        await bus.close()
    # A JWT for one key signed by an account the server does not know.
    stranger = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    bad = creds_file(tmp_path / "bad.creds", jwt(stranger, user.public_key, claims), user.seed)
    bus = await connects(url, NatsLogin(creds_file=bad), expect=False)
    await bus.close(timeout=1)


# -- TLS with the server's CA and a client certificate ----------------------------------------


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[tuple[int, trustme.CA]]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pem = tmp_path / "server.pem"
    conf = f'tls {{ cert_file: "{pem}", key_file: "{pem}", ca_file: "{tmp_path / "ca.pem"}", verify: true }}'
    for port in serve(tmp_path, conf):
        yield port, ca


def client_files(tmp_path: Path, ca: trustme.CA, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(f"{name}@clients.test")
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_tls_with_own_ca_and_client_certificate(
    mtls_server: tuple[int, trustme.CA], tmp_path: Path
) -> None:
    port, ca = mtls_server
    url = f"tls://127.0.0.1:{port}"
    ca_path = tmp_path / "trust.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert, key = client_files(tmp_path, ca, "opmasd")
    bus = await connects(url, NatsLogin(tls_ca=ca_path, tls_cert=cert, tls_key=key), expect=True)
    try:
        assert (await round_trip(bus)).agent_id == "a1"
    finally:
        await bus.close()
    # Without a client certificate, and with one from another CA: refused by the server.
    await (await connects(url, NatsLogin(tls_ca=ca_path), expect=False)).close(timeout=1)
    stranger_cert, stranger_key = client_files(tmp_path, trustme.CA(), "stranger")
    login = NatsLogin(tls_ca=ca_path, tls_cert=stranger_cert, tls_key=stranger_key)
    await (await connects(url, login, expect=False)).close(timeout=1)
    # Trusting only the system's CAs, the server's certificate is refused by the bus.
    await (await connects(url, NatsLogin(tls_cert=cert, tls_key=key), expect=False)).close(timeout=1)


async def test_a_plain_client_cannot_read_what_the_tls_bus_sends(mtls_server: tuple[int, trustme.CA]) -> None:
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await nats.connect(f"nats://127.0.0.1:{mtls_server[0]}", allow_reconnect=False, connect_timeout=1)
