"""gRPC's TCP address, accepted by opmasd itself and relayed to grpc: TcpFront.

grpc's Python server offers no hook at accept: it caps the connections of a listener in all,
never per host, so one host holding idle connections locked every token holder out. So
opmasd listens on grpc.address itself, counts each connection from its accept (HostCaps: a
host holds at most 1/HOST_SHARE of them), closes what is past a cap at once, unread, and
relays the others byte for byte to the grpc server listening on a private unix socket (TLS,
when configured, is still grpc's own, end to end over the relay).

grpc must still know the caller's address (the gate paces refusals per host and the audit
records it): each relayed connection comes from a unix socket bound to an abstract name that
carries it, and grpc reports that name as the call's peer ("unix-abstract:opmas-front/<random>/
ipv4:10.0.0.7:53422"); network_peer turns it back into "ipv4:10.0.0.7:53422". The random part
(64 bits) is what keeps a local user from taking the names first.

When the address is full, a newcomer from a host holding fewer connections than the host that
holds most takes the oldest of that host's (max-min fairness): hosts filling the address with
idle connections cannot lock out one that holds few, such as a token holder's client.

A relay ends both ways at once when either side ends, but a client's half-close is passed on
(one that sends its call then shuts its writing down still gets the answer, for CLOSE_DEADLINE);
a side still flushing CLOSE_DEADLINE after the end is cut, and the host's slot is held until
both sockets are gone, so a client that stops reading cannot pin sockets or kernel buffers past
its share.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
from pathlib import Path
from urllib.parse import unquote

import structlog

from opmasd.api.accepting import accepted
from opmasd.api.host_caps import HostCaps
from opmasd.api.refusal_pacing import host_of

log = structlog.get_logger(__name__)

# The grpc server's socket, in the runtime directory (0600: only opmasd may connect to it).
RELAY_SOCKET = "grpc-relay.sock"
# One host may hold at most this share of the address's connections (1/8): a client needs one
# connection (grpc multiplexes its calls over it), a busy host a few.
HOST_SHARE = 8
_PREFIX = "opmas-front/"
_PEER_PREFIX = "unix-abstract:" + _PREFIX
# A relay stops reading one side while the other has this much unsent (a slow reader must not
# make the daemon buffer what a fast writer sends).
HIGH_WATER = 256 * 1024
# How long a relay that ended may still flush to a side before that side is cut.
CLOSE_DEADLINE = 5.0


def network_peer(peer: str) -> str:
    """The TCP peer of a call relayed by a TcpFront; any other peer as it is (never a local
    one: a name that does not carry a network address stays "unix-abstract:...")."""
    if not peer.startswith(_PEER_PREFIX):
        return peer
    # grpc percent-encodes what a URI may not hold as it is (the brackets of an IPv6 address).
    parts = unquote(peer[len(_PEER_PREFIX) :]).split("/", 1)
    carried = parts[1] if len(parts) == 2 else ""
    return carried if carried.startswith(("ipv4:", "ipv6:")) else peer


def grpc_peer(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A TCP socket address as grpc writes a peer: "ipv4:ADDR:PORT" or "ipv6:[ADDR]:PORT"; an
    IPv4 client of a dual-stack listener ("::ffff:10.0.0.7") is the IPv4 one it is."""
    host, port = address[0], address[1]
    if ":" in host:
        try:
            mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is None:
            return f"ipv6:[{host}]:{port}"
        host = str(mapped)
    return f"ipv4:{host}:{port}"


def split_listen_address(address: str) -> tuple[str, int]:
    """("::1", 50051) for "[::1]:50051", ("127.0.0.1", 0) for "127.0.0.1:0"."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class TcpFront:
    def __init__(self, address: str, upstream: Path, limit: int) -> None:
        """address: host:port to listen on (port 0 picks one: see port); upstream: the grpc
        server's unix socket; limit: connections held at once (1/HOST_SHARE per host)."""
        self._address = address
        self._upstream = upstream
        self.caps = HostCaps(limit, HOST_SHARE, "gRPC TCP address")
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._by_host: dict[str | None, list[_Relay]] = {}  # the live relays, oldest first
        self._unreachable = 0
        self.port = 0

    async def start(self) -> None:
        """Listen (OSError when the address cannot be bound)."""
        host, port = split_listen_address(self._address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dual = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
        sock = socket.create_server((host, port), family=family, backlog=512, dualstack_ipv6=dual)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever(sock))

    async def stop_accepting(self) -> None:
        """Take no more connections; those relayed go on (grpc's grace period is theirs)."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

    def close(self) -> None:
        """Cut every relayed connection at once (grpc's grace is over: what it still writes to
        a client that does not read would otherwise hold its shutdown for ever)."""
        for relay in [relay for held in self._by_host.values() for relay in held]:
            relay.abort()

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        async for conn, address in accepted(sock, "gRPC TCP address"):
            peer = grpc_peer(address)
            host = host_of(peer)
            if not self.caps.admit(host) and not (self._evict_for(host) and self.caps.admit(host)):
                conn.close()
                continue
            try:
                upstream = self._connect_upstream(peer)
            except OSError as exc:
                self.caps.release(host)
                conn.close()
                self._unreachable += 1
                if self._unreachable in (1, 100) or self._unreachable % 10_000 == 0:  # not once each
                    log.error(
                        "cannot reach the gRPC server's socket",
                        path=str(self._upstream),
                        error=str(exc),
                        times=self._unreachable,
                    )
                continue
            relay = _Relay(self, host)
            self._by_host.setdefault(host, []).append(relay)
            try:
                await loop.connect_accepted_socket(relay.downstream_side, conn)
                await loop.create_unix_connection(relay.upstream_side, sock=upstream)
            except OSError as exc:
                relay.abort()
                for sock_ in (conn, upstream):
                    sock_.close()  # (a no-op for one its transport owns and has closed)
                if relay.made == 0:
                    self._ended(relay)
                log.warning("a gRPC connection could not be relayed", peer=peer, error=str(exc))

    def _evict_for(self, host: str | None) -> bool:
        """With the address full: cut the oldest connection of the host holding most, when it
        holds more than `host` would with one more. Whether a slot was freed."""
        if not self.caps.full or not self._by_host:
            return False
        largest = max(self._by_host, key=lambda h: len(self._by_host[h]))
        if len(self._by_host[largest]) <= len(self._by_host.get(host, ())) + 1:
            return False
        victim = self._by_host[largest][0]
        victim.abort()
        self._ended(victim)  # its slot is free now; its sockets go at the next turn
        return True

    def _connect_upstream(self, peer: str) -> socket.socket:
        """A unix socket to the grpc server, bound to a name that carries the peer's address."""
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind(f"\0{_PREFIX}{secrets.token_hex(8)}/{peer}")
            upstream.connect(str(self._upstream))  # a local listening socket: at once
            upstream.setblocking(False)
        except BaseException:
            upstream.close()
            raise
        return upstream

    def _ended(self, relay: _Relay) -> None:
        """The relay's slot is free (once: both its sockets are gone, or it was evicted)."""
        held = self._by_host.get(relay.host, [])
        if relay in held:
            held.remove(relay)
            if not held:
                self._by_host.pop(relay.host, None)
            self.caps.release(relay.host)


class _Relay:
    """One client connection and its connection to grpc: what one side sends, the other gets.
    Either side's end ends both (a half-close is passed on first); its slot is freed once both
    sockets are gone, at most CLOSE_DEADLINE after the end."""

    def __init__(self, front: TcpFront, host: str | None) -> None:
        self.front = front
        self.host = host
        self.downstream = _Side(self)
        self.upstream = _Side(self)
        self.downstream.other = self.upstream
        self.upstream.other = self.downstream
        self.closed = False
        self.made = 0  # sides connected
        self.lost = 0  # sides gone
        self._cut: asyncio.TimerHandle | None = None

    def downstream_side(self) -> _Side:
        return self.downstream

    def upstream_side(self) -> _Side:
        return self.upstream

    def close(self) -> None:
        """End both sides, letting each flush what it holds for at most CLOSE_DEADLINE."""
        if self.closed:
            return
        self.closed = True
        for side in (self.downstream, self.upstream):
            if side.transport is not None:
                side.transport.close()
        self.cut_later()

    def cut_later(self) -> None:
        """Abort in CLOSE_DEADLINE, unless both sides are gone by then."""
        if self._cut is None:
            self._cut = asyncio.get_running_loop().call_later(CLOSE_DEADLINE, self.abort)

    def abort(self) -> None:
        """End both sides at once, dropping what they hold."""
        self.closed = True
        for side in (self.downstream, self.upstream):
            if side.transport is not None:
                side.transport.abort()

    def side_lost(self) -> None:
        self.lost += 1
        self.close()
        if self.lost >= self.made:
            if self._cut is not None:
                self._cut.cancel()
            self.front._ended(self)


class _Side(asyncio.Protocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.other: _Side
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # what came before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay.made += 1
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.relay.closed:
            transport.abort()
            return
        if self.other.pending:
            transport.writelines(self.other.pending)
            self.other.pending.clear()
            if self.other.transport is not None:
                self.other.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        target = self.other.transport
        if target is None:
            self.pending.append(data)
            if sum(map(len, self.pending)) > HIGH_WATER and self.transport is not None:
                self.transport.pause_reading()
            return
        target.write(data)

    def eof_received(self) -> bool | None:
        """The client's half-close is passed on to grpc, whose answer may still come; grpc's
        end (it sends nothing more) ends the relay."""
        target = self.other.transport
        if self is self.relay.upstream or target is None or not target.can_write_eof():
            self.relay.close()
            return None
        target.write_eof()
        # The answer may come, but no longer than a closing relay may flush (grpc's end may go
        # unseen while its side waits for a client that reads nothing).
        self.relay.cut_later()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.side_lost()

    # The other side's reading waits while this side's writes are backed up.
    def pause_writing(self) -> None:
        if self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other.transport is not None and not self.relay.closed:
            self.other.transport.resume_reading()
