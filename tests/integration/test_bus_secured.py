"""NatsBus against a nats-server that wants a password, and one that speaks only TLS.

nats.user / nats.password / nats.tls_verify must work against a real server: right credentials
connect and deliver, wrong ones leave the bus disconnected (and retrying) without an error
escaping; tls_verify=false accepts a self-signed certificate, tls_verify=true refuses it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from opmasd.bus.connection import NatsBus
from opmasd.bus.embedded import find_binary
from opmasd.bus.login import NatsLogin
from opmasd.bus.subjects import Subjects
from opmasd.core.messages import Heartbeat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(find_binary()), "-a", "127.0.0.1", *args], stderr=subprocess.DEVNULL)


def wait_listening(port: int) -> None:
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nats-server did not listen on {port}")


@pytest.fixture
def password_server() -> Iterator[int]:
    port = free_port()
    proc = start_server(["-p", str(port), "--user", "opmas", "--pass", "s3cret"])
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test server's certificate (apt-get install openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = free_port()
    proc = start_server(["-p", str(port), "--tls", "--tlscert", str(cert), "--tlskey", str(key)])
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def delivered(bus: NatsBus, url: str, **client: object) -> Heartbeat:
    got: asyncio.Queue[Heartbeat] = asyncio.Queue()
    bus.set_handlers(got.put_nowait, lambda report: None)
    nc = await nats.connect(url, **client)  # type: ignore[arg-type]
    try:
        await nc.publish("sec.status", json.dumps({"agent_id": "a1", "status": "running"}).encode())
        await nc.flush()
        return await asyncio.wait_for(got.get(), 5)
    finally:
        await nc.close()


async def test_password_is_used(password_server: int) -> None:
    url = f"nats://127.0.0.1:{password_server}"
    bus = await NatsBus.connect(
        url, login=NatsLogin(user="opmas", password="s3cret"), subjects=Subjects("sec")
    )
    try:
        assert bus.is_connected
        assert bus.agent_url == url  # agents are told where, not the password
        heartbeat = await delivered(bus, url, user="opmas", password="s3cret")
        assert heartbeat.agent_id == "a1"
    finally:
        await bus.close()


async def test_wrong_password_leaves_the_bus_disconnected_not_crashed(password_server: int) -> None:
    url = f"nats://127.0.0.1:{password_server}"
    bus = await NatsBus.connect(
        url, login=NatsLogin(user="opmas", password="wrong"), subjects=Subjects("sec"), initial_wait=1.0
    )
    try:
        assert not bus.is_connected
    finally:
        await bus.close(timeout=1.0)


async def test_tls_without_verification_accepts_a_self_signed_server(tls_server: int) -> None:
    url = f"tls://127.0.0.1:{tls_server}"
    bus = await NatsBus.connect(url, login=NatsLogin(tls_verify=False), subjects=Subjects("sec"))
    try:
        assert bus.is_connected
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        assert (await delivered(bus, url, tls=insecure)).agent_id == "a1"
    finally:
        await bus.close()


async def test_tls_with_verification_refuses_an_unknown_certificate(tls_server: int) -> None:
    url = f"tls://127.0.0.1:{tls_server}"
    bus = await NatsBus.connect(
        url, login=NatsLogin(tls_verify=True), subjects=Subjects("sec"), initial_wait=1.5
    )
    try:
        assert not bus.is_connected
    finally:
        await bus.close(timeout=1.0)
