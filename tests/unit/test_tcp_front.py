"""The TCP front of gRPC (api.tcp_front): calls are relayed to the grpc server with the
caller's network address as their peer; one host holds at most its share of the connections,
and a connection past it is closed unread; what a relay holds is gone with the connection."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from opmasd.api import tcp_front
from opmasd.api.refusal_pacing import host_of
from opmasd.api.tcp_front import HOST_SHARE, TcpFront, grpc_peer, network_peer, split_listen_address


def test_the_peer_named_by_the_relay_is_the_network_one() -> None:
    relayed = "unix-abstract:opmas-front/41ab/ipv4:10.0.0.7:53422"
    assert network_peer(relayed) == "ipv4:10.0.0.7:53422"
    assert network_peer("unix-abstract:opmas-front/41ac/ipv6:%5Bfd00::1%5D:4000") == "ipv6:[fd00::1]:4000"
    # Anything else is left as it is (the gate then treats it as what it is).
    for peer in ("unix:", "ipv4:127.0.0.1:5000", "unix-abstract:other", "unix-abstract:opmas-front/x"):
        assert network_peer(peer) == peer


def test_listen_addresses() -> None:
    assert split_listen_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_listen_address("[::1]:0") == ("::1", 0)
    assert split_listen_address("0.0.0.0:7") == ("0.0.0.0", 7)


class PeerEcho(health.aio.HealthServicer):  # type: ignore[misc]
    """Health's Check, answering with the peer it saw in the status's service name."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str] = []

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.peers.append(context.peer())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _with_front(path: Path, limit: int, body: Any) -> Any:
    server = grpc.aio.server()
    echo = PeerEcho()
    health_pb2_grpc.add_HealthServicer_to_server(echo, server)
    assert server.add_insecure_port(f"unix://{path}")
    await server.start()
    front = TcpFront("127.0.0.1:0", path, limit)
    await front.start()
    try:
        return await body(front, echo)
    finally:
        await front.stop_accepting()
        await server.stop(0)
        front.close()


def test_a_call_is_relayed_and_its_peer_is_the_callers_address(tmp_path: Path) -> None:
    async def body(front: TcpFront, echo: PeerEcho) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            big = "x" * 3_000_000  # bigger than any buffer on the way: flow control holds
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=big), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        (peer,) = echo.peers
        assert network_peer(peer).startswith("ipv4:127.0.0.1:"), peer
        await asyncio.sleep(0.1)
        assert front.caps.open == 0  # the channel closed: nothing is held

    asyncio.run(_with_front(tmp_path / "grpc.sock", 16, body))


async def _connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.setblocking(False)
    return sock


async def _closed_unread(sock: socket.socket) -> bool:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 10), 5) == b""
    except ConnectionResetError:
        return True


def test_one_host_holds_its_share_and_no_more(tmp_path: Path) -> None:
    limit = 2 * HOST_SHARE  # two a host

    async def body(front: TcpFront, echo: PeerEcho) -> None:
        held = [await _connect(front.port, "127.0.0.1") for _ in range(2)]
        third = await _connect(front.port, "127.0.0.1")
        assert await _closed_unread(third)
        other = await _connect(front.port, "127.0.0.2")
        await asyncio.sleep(0.1)
        assert front.caps.open == 3 and front.caps.held_by("127.0.0.1") == 2
        for sock in (*held, other, third):
            sock.close()
        await asyncio.sleep(0.1)
        assert front.caps.open == 0 and front.caps.held_by("127.0.0.1") == 0

    asyncio.run(_with_front(tmp_path / "grpc.sock", limit, body))


def test_a_missing_grpc_socket_closes_the_connection_and_counts_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        front = TcpFront("127.0.0.1:0", tmp_path / "absent.sock", 16)
        await front.start()
        try:
            sock = await _connect(front.port, "127.0.0.1")
            assert await _closed_unread(sock)
            sock.close()
            assert front.caps.open == 0
        finally:
            await front.stop_accepting()

    asyncio.run(body())


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "999.1.1.1:0"])
def test_an_address_that_cannot_be_bound_fails_start(tmp_path: Path, address: str) -> None:
    async def body() -> None:
        with pytest.raises((OSError, ValueError)):
            await TcpFront(address, tmp_path / "grpc.sock", 16).start()

    asyncio.run(body())


def test_ipv6_callers_are_named_as_grpc_names_them(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")

    async def body() -> None:
        server = grpc.aio.server()
        echo = PeerEcho()
        health_pb2_grpc.add_HealthServicer_to_server(echo, server)
        assert server.add_insecure_port(f"unix://{tmp_path / 'grpc.sock'}")
        await server.start()
        front = TcpFront("[::1]:0", tmp_path / "grpc.sock", 16)
        try:
            await front.start()
        except OSError:
            pytest.skip("no ::1 here")
        try:
            async with grpc.aio.insecure_channel(f"[::1]:{front.port}") as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            (peer,) = echo.peers
            assert network_peer(peer).startswith("ipv6:[::1]:"), peer
        finally:
            await front.stop_accepting()
            await server.stop(0)
            front.close()

    asyncio.run(body())


# -- the relay's ends, against a plain unix server (the front does not care what it speaks) ----


async def _unix_server(path: Path, handle: Any) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(handle, str(path))


def test_a_half_close_is_passed_on_and_the_answer_still_arrives(tmp_path: Path) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked = await reader.read()  # until the client's end
        writer.write(b"answer to " + asked)
        await writer.drain()
        writer.close()

    async def body() -> None:
        server = await _unix_server(tmp_path / "up.sock", answer)
        front = TcpFront("127.0.0.1:0", tmp_path / "up.sock", 16)
        await front.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(b"question")
            writer.write_eof()  # sent, and nothing more to say
            assert await asyncio.wait_for(reader.read(), 5) == b"answer to question"
            writer.close()
            await asyncio.sleep(0.1)
            assert front.caps.open == 0
        finally:
            await front.stop_accepting()
            front.close()
            server.close()

    asyncio.run(body())


def test_a_client_that_stops_reading_holds_its_slot_and_sockets_no_longer_than_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tcp_front, "CLOSE_DEADLINE", 0.5)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * (20 << 20))  # far more than the kernel buffers hold
        await reader.read()  # until the client's end, passed on
        writer.transport.abort()  # as grpc tears a connection down at its client's end

    async def body() -> None:
        server = await _unix_server(tmp_path / "up.sock", flood)
        front = TcpFront("127.0.0.1:0", tmp_path / "up.sock", 16)
        await front.start()
        try:
            sock = await _connect(front.port, "127.0.0.1")  # never reads
            await asyncio.sleep(0.3)
            sock.shutdown(socket.SHUT_WR)  # and ends its side, with megabytes unread
            await asyncio.sleep(0.2)
            assert front.caps.open == 1  # the relay flushes what it can: the slot is still held
            await asyncio.sleep(1.0)
            assert front.caps.open == 0, "a client that reads nothing kept its slot past the deadline"
            sock.close()
        finally:
            await front.stop_accepting()
            front.close()
            server.close()

    asyncio.run(body())


def test_close_cuts_relays_at_once_even_with_data_unsent(tmp_path: Path) -> None:
    """What grpc's stop needs once its grace is over: a relay it writes to is gone."""

    async def body() -> None:
        ended = asyncio.Event()

        async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    writer.write(b"x" * (1 << 20))
                    await writer.drain()  # blocks: the client reads nothing
            except (ConnectionError, OSError):
                ended.set()

        server = await _unix_server(tmp_path / "up.sock", stuck)
        front = TcpFront("127.0.0.1:0", tmp_path / "up.sock", 16)
        await front.start()
        try:
            sock = await _connect(front.port, "127.0.0.1")
            await asyncio.sleep(0.3)
            front.close()
            await asyncio.wait_for(ended.wait(), 2)  # the writer's drain fails: not held for ever
            await asyncio.sleep(0.1)
            assert front.caps.open == 0
            sock.close()
        finally:
            await front.stop_accepting()
            server.close()

    asyncio.run(body())


def test_a_full_address_takes_a_newcomer_from_the_host_holding_most(tmp_path: Path) -> None:
    limit = 2 * HOST_SHARE  # two a host; eight hosts fill it

    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def body() -> None:
        server = await _unix_server(tmp_path / "up.sock", idle)
        front = TcpFront("127.0.0.1:0", tmp_path / "up.sock", limit)
        await front.start()
        try:
            held = [await _connect(front.port, f"127.0.0.{n}") for n in range(1, 9) for _ in range(2)]
            await asyncio.sleep(0.1)
            assert front.caps.open == limit
            newcomer = await _connect(front.port, "127.0.0.100")
            await asyncio.sleep(0.1)
            assert front.caps.held_by("127.0.0.100") == 1 and front.caps.open == limit
            # A host already down to one cannot take from one holding two.
            assert sum(front.caps.held_by(f"127.0.0.{n}") for n in range(1, 9)) == limit - 1
            for sock in (*held, newcomer):
                sock.close()
        finally:
            await front.stop_accepting()
            front.close()
            server.close()

    asyncio.run(body())


def test_ipv4_clients_of_a_dual_stack_listener_are_ipv4_hosts() -> None:
    assert grpc_peer(("::ffff:10.0.0.7", 5000, 0, 0)) == "ipv4:10.0.0.7:5000"
    assert grpc_peer(("fd00::1", 5000, 0, 0)) == "ipv6:[fd00::1]:5000"
    assert host_of("ipv6:[::ffff:10.0.0.7]:5000") == "10.0.0.7"
    assert host_of("ipv6:[fd00::1]:5000") == "fd00::/64"


def test_a_relay_name_that_carries_no_network_address_is_never_local() -> None:
    for name in ("opmas-front/ab/unix:", "opmas-front/ab/unix:/run/x", "opmas-front/ab"):
        peer = f"unix-abstract:{name}"
        assert network_peer(peer) == peer and not network_peer(peer).startswith("unix:")
