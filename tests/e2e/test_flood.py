"""What a flood of requests without credentials costs the others (issue 11, "Abuse").

- Refusals for want of a token are paced per host after a burst (api.refusal_pacing): a host
  that keeps calling without one waits longer and longer, while a caller with a token from the
  same host is answered at once, on gRPC and REST alike.
- Each listener caps its own connections: filling the TCP addresses' caps refuses the next
  network connection, while the unix sockets (the local admin door) still answer; and one host
  holds at most a quarter of REST's, an eighth of gRPC's (opmasd accepts them: api.tcp_front).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from opmas.v1 import agents_pb2 as pb
from opmas.v1 import auth_pb2

from .harness import Sandbox, call_error, free_port, sandbox
from .rest_client import rest_env, rest_of

pytestmark = pytest.mark.timeout(120)

BURST, RATE = 50, 20.0  # RefusalPacer's defaults: what a host gets at once, then per second


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    port = free_port()
    env = rest_env(port, OPMAS_GRPC_MAX_CONNECTIONS="4", OPMAS_REST_MAX_CONNECTIONS="8")
    with sandbox("flood", env=env) as box:
        box.rest_port = port  # type: ignore[attr-defined]
        box.start()
        yield box


def test_refusals_past_the_burst_are_paced_and_callers_with_a_token_are_not(box: Sandbox) -> None:
    anonymous = box.daemon.tcp_stub(token=None)
    viewer = box.daemon.tcp_stub(box.create_token(auth_pb2.ROLE_VIEWER, "flood").secret)
    began = time.monotonic()
    extra = 30
    for _ in range(BURST + extra):
        error = call_error(lambda: anonymous.ListAgents(pb.ListAgentsRequest(), timeout=30))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
    took = time.monotonic() - began
    assert took >= 0.8 * extra / RATE, f"{BURST + extra} refusals in {took:.2f}s: not paced"
    # The host is now behind its pace: one more refusal waits, the token holder does not.
    t0 = time.monotonic()
    viewer.ListAgents(pb.ListAgentsRequest(), timeout=10)
    assert time.monotonic() - t0 < 0.5
    rest = rest_of(box, anonymous=True)
    t0 = time.monotonic()
    assert rest.request("GET", "/api/v1/agents").status == 401
    assert time.monotonic() - t0 >= 0.8 / RATE  # REST refusals share the host's pace
    rest.close()
    assert rest_of(box).request("GET", "/api/v1/agents").status == 200


def test_a_full_tcp_listener_leaves_the_unix_socket_open(box: Sandbox) -> None:
    box.daemon.close_channels()  # the previous test's TCP connections (they would count)
    time.sleep((BURST + 40) / RATE)  # and its pace caught up
    host, rest_port = "127.0.0.1", int(box.rest_port)  # type: ignore[attr-defined]
    held = []
    try:
        for n in range(1, 9):  # rest.max_connections: 8, from eight hosts (two each at most)
            held.append(
                socket.create_connection((host, rest_port), timeout=5, source_address=(f"127.0.0.{n}", 0))
            )
        extra = socket.create_connection((host, rest_port), timeout=5, source_address=("127.0.0.9", 0))
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        extra.settimeout(5)
        try:
            assert extra.recv(100) == b"", "a fifth REST connection was served"
        except ConnectionResetError:
            pass  # closed without reading the request: a reset is as good
        extra.close()
        # grpc.max_connections 4, one per host (an eighth, at least one): four hosts fill it.
        grpc_port = int(box.address.rpartition(":")[2])
        held += [http2_connection(grpc_port, f"127.0.0.{n}") for n in range(1, 5)]
        assert all(speaks_http2(sock) for sock in held[-4:]), "a connection within the caps was not served"
        assert not speaks_http2(http2_connection(grpc_port, "127.0.0.5")), "a fifth connection was served"
        # The local admin door is a listener of its own: still open.
        assert box.daemon.stub.ListAgents(pb.ListAgentsRequest(), timeout=5) is not None
    finally:
        for sock in held:
            sock.close()


# A client's HTTP/2 preface and an empty SETTINGS frame: what a gRPC client sends first.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def http2_connection(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(HTTP2_PREFACE)
    return sock


def speaks_http2(sock: socket.socket) -> bool:
    """Whether grpc answered the preface with its SETTINGS (frame type 4), rather than the
    connection being closed unread."""
    try:
        head = sock.recv(9)
    except ConnectionResetError:
        return False
    return len(head) == 9 and head[3] == 4


def test_one_host_holds_at_most_an_eighth_of_the_grpc_connections(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    """grpc.max_connections 16: one host holding connections open gets 2; the third is closed
    unread, while another host (127.0.0.2) is still served, and so is a token holder's call
    on a connection of its own, once the host's connections are closed (none is left held)."""
    box = make_sandbox(env={"OPMAS_GRPC_MAX_CONNECTIONS": "16"})
    box.start()
    port = int(box.address.rpartition(":")[2])
    held = [http2_connection(port, "127.0.0.1") for _ in range(2)]
    try:
        assert all(speaks_http2(sock) for sock in held)
        assert not speaks_http2(http2_connection(port, "127.0.0.1")), "a third connection of one host"
        other = http2_connection(port, "127.0.0.2")
        assert speaks_http2(other), "another host was locked out"
        other.close()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)  # the relays see the ends
    viewer = box.daemon.tcp_stub(box.create_token(auth_pb2.ROLE_VIEWER, "after").secret)
    assert viewer.ListAgents(pb.ListAgentsRequest(), timeout=10) is not None


def test_one_host_holds_at_most_a_quarter_of_the_rest_connections(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    """rest.max_connections 8: one host (127.0.0.1) holding connections open gets 2; the third
    is closed unread, and a connection from 127.0.0.2 (another host) is still served."""
    port = free_port()
    box = make_sandbox(env=rest_env(port, OPMAS_REST_MAX_CONNECTIONS="8"))
    box.start()
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        extra.settimeout(5)
        try:
            assert extra.recv(100) == b"", "a third connection of one host was served"
        except ConnectionResetError:
            pass
        extra.close()
        other = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        other.settimeout(5)
        assert other.recv(100).startswith(b"HTTP/1.1 200"), "another host was locked out"
        other.close()
    finally:
        for sock in held:
            sock.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(text: str) -> bytes:  # an HPACK string, short and not Huffman-coded
    return bytes([len(text)]) + text.encode()


def unread_answers(port: int, calls: int) -> socket.socket:
    """A client that opens a window of 2 GiB, asks grpc's reflection (open to all) for the
    schema `calls` times on one stream (megabytes of answers) and reads none of it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    window = (2**31 - 1).to_bytes(4, "big")
    settings = (4).to_bytes(2, "big") + window  # SETTINGS_INITIAL_WINDOW_SIZE
    headers = b"".join(
        b"\x00" + _literal(k) + _literal(v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    ask = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="opmas.v1.AgentService"
    ).SerializeToString()
    message = b"\x00" + len(ask).to_bytes(4, "big") + ask
    sock.sendall(
        HTTP2_PREFACE[:24]
        + _frame(4, 0, 0, settings)
        + _frame(8, 0, 0, (2**31 - 1 - 65535).to_bytes(4, "big"))
        + _frame(1, 4, 1, headers)
        + _frame(0, 0, 1, message * calls)
    )
    return sock


def test_a_client_that_reads_nothing_does_not_hold_the_daemon_s_stop(
    make_sandbox: Callable[..., Sandbox],
) -> None:
    """grpc writes answers the relay cannot pass on (the client reads none): once the grace
    period is over the relay is cut, and opmasd exits (it once waited for ever)."""
    box = make_sandbox(env={"OPMAS_GRPC_GRACE_PERIOD": "1s"})
    box.start()
    port = int(box.address.rpartition(":")[2])
    sock = unread_answers(port, 400)
    try:
        time.sleep(1.5)  # answers pile up in the relay and the kernel buffers
        began = time.monotonic()
        assert box.daemon.stop(timeout=20) == 0
        assert time.monotonic() - began < 10, "opmasd's stop waited on a client that reads nothing"
    finally:
        sock.close()
