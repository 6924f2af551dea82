"""api.tls.ServerTls: what a reload switches, and what it keeps until a restart.

Served for real: aiohttp on the listening context (REST's switch to the current context in the
SNI callback, with clients that send no server name) and a grpc.aio server on the dynamic
credentials (grpc's fetcher). The mTLS mode (client certificates required or not) stays as the
listeners were made, with the running client CA when a reload drops it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import cast

import grpc
import pytest
import trustme
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from opmas.tlsfiles import ServerFiles, read_server_files
from opmasd.api.tls import ServerTls


def server_files(folder: Path, ca: trustme.CA, client_ca: trustme.CA | None, tag: str) -> ServerFiles:
    issued = ca.issue_cert("127.0.0.1", organization_name=tag)
    cert, key, cafile = folder / f"{tag}.pem", folder / f"{tag}.key", folder / f"{tag}-clients.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    key.chmod(0o600)
    if client_ca is not None:
        client_ca.cert_pem.write_to_path(str(cafile))
    return read_server_files(cert, key, cafile if client_ca is not None else None)


def test_a_reload_cannot_turn_mtls_off_and_keeps_the_running_client_ca(tmp_path: Path) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    tls = ServerTls(server_files(tmp_path, ca, clients, "one"))
    prepared = tls.prepare(server_files(tmp_path, ca, None, "two"))
    assert prepared.kept_mode is not None and "until opmasd restarts" in prepared.kept_mode
    assert (
        prepared.files.client_ca is not None and prepared.files.client_ca.path == tmp_path / "one-clients.pem"
    )
    assert prepared.rest.verify_mode == ssl.CERT_REQUIRED


def test_a_reload_cannot_turn_mtls_on(tmp_path: Path) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    tls = ServerTls(server_files(tmp_path, ca, None, "one"))
    prepared = tls.prepare(server_files(tmp_path, ca, clients, "two"))
    assert prepared.kept_mode is not None and "not asked for until opmasd restarts" in prepared.kept_mode
    assert prepared.files.client_ca is None and prepared.rest.verify_mode == ssl.CERT_NONE


def test_grpc_takes_a_prepared_configuration_once(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = ServerTls(server_files(tmp_path, ca, None, "one"))
    assert tls._fetch() is None  # nothing new: grpc keeps what it has
    tls.replace(tls.prepare(server_files(tmp_path, ca, None, "two")))
    assert tls._fetch() is not None
    assert tls._fetch() is None
    assert "O=two" in tls.summary.subject


def _https_subject(port: int, ca: trustme.CA) -> str:
    """The organization of the certificate served (Python sends no SNI for an IP address: the
    switch must happen without a server name)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as wrapped,
    ):
        cert = wrapped.getpeercert()
    assert cert is not None
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert["subject"])
    return dict(pair for rdn in subject for pair in rdn)["organizationName"]


async def test_both_listeners_serve_the_new_files_after_a_reload(tmp_path: Path) -> None:
    first, second = trustme.CA(), trustme.CA()
    tls = ServerTls(server_files(tmp_path, first, None, "one"))
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.rest_context())
    await site.start()
    rest_port = runner.addresses[0][1]
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    grpc_port = server.add_secure_port("127.0.0.1:0", tls.grpc_credentials())
    await server.start()

    async def grpc_ok(ca: trustme.CA) -> bool:
        creds = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(f"127.0.0.1:{grpc_port}", creds, options=options) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                return False
        return True

    try:
        assert await asyncio.to_thread(_https_subject, rest_port, first) == "one"
        assert await grpc_ok(first)
        tls.replace(await asyncio.to_thread(tls.prepare, server_files(tmp_path, second, None, "two")))
        assert await asyncio.to_thread(_https_subject, rest_port, second) == "two"
        assert await grpc_ok(second)
        assert not await grpc_ok(first)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(_https_subject, rest_port, first)
    finally:
        await server.stop(0)
        await runner.cleanup()
