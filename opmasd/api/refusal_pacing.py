"""Pacing the refusals of callers without valid credentials, per peer host: RefusalPacer.

A flood of requests without a token must not cost the callers that have one. Python's gRPC
and HTTP servers run every request on the event loop, and a refusal is no cheaper to receive
than a call, so refusing faster only invites more. Instead, a host that keeps presenting no
valid credentials gets its answers paced: `burst` refusals answered at once, then one per
1/`rate` seconds. The waiting request holds its HTTP/2 stream (gRPC) or its connection (REST),
and the listeners cap both (streams per connection, connections per listener), so a flooding
client is slowed down to the pace instead of the loop to the flood.

What waits is bounded (held_per_host, held_total, held_bytes): a request too large to keep, or
one past those counts, is answered at once. held_per_host is what one host can have in flight
on gRPC's TCP address (its share of the connections times streams per connection), so a flooding
host's calls all wait and cost nothing until each is answered; a waiting call costs some 30 KB
(grpc's call, its task), which held_total bounds (~120 MB). Only refusals for want of
credentials are paced (a caller with a valid token is identified and audited, and answered at
once); hosts are keyed by IPv4 address or IPv6 /64, the block a single machine usually holds.
What is kept per host is one float, for at most `max_hosts` hosts: a flood leaves nothing
behind once its pace has caught up.
"""

from __future__ import annotations

import ipaddress

import structlog

from opmasd.core.clock import Clock

log = structlog.get_logger(__name__)


class RefusalPacer:
    def __init__(
        self,
        clock: Clock,
        *,
        rate: float = 20.0,
        burst: int = 50,
        max_hosts: int = 4096,
        held_per_host: int = 2048,
        held_total: int = 4096,
        held_bytes: int = 64 * 1024,
    ) -> None:
        """held_*: a waiting refusal keeps its request in memory, so at most held_per_host of
        one host's and held_total in all wait, each of at most held_bytes; any other is
        answered at once (a flood of those costs the loop, not the memory)."""
        if rate <= 0 or burst < 1 or max_hosts < 1:
            raise ValueError("RefusalPacer needs rate > 0, burst >= 1 and max_hosts >= 1")
        self._held: dict[str, int] = {}
        self._held_total = 0
        self._limits = (held_per_host, held_total, held_bytes)
        self._clock = clock
        self._interval = 1.0 / rate
        self._tolerance = burst * self._interval
        self._max_hosts = max_hosts
        # host -> the time its next refusal would be due with no burst left (GCRA's "TAT").
        self._due: dict[str, float] = {}
        self._forgot = 0

    def delay(self, peer: str) -> float:
        """Reserve the next refusal slot of the peer's host; seconds to wait before answering."""
        host = host_of(peer)
        if host is None:
            return 0.0
        now = self._clock.monotonic()
        due = max(self._due.pop(host, now), now) + self._interval
        self._due[host] = due  # re-inserted: the dict's order is least recently refused first
        if len(self._due) > self._max_hosts:
            self._forget(now)
        wait = due - self._tolerance - now
        return wait if wait > 1e-6 else 0.0  # (float sums of the interval drift by ~1e-13)

    async def pace(self, peer: str, size: int = 0) -> None:
        """Wait for the peer's refusal slot (returns at once within its burst, and when holding
        a request of `size` bytes more would pass the bounds on what waits)."""
        wait = self.delay(peer)
        host = host_of(peer)
        if wait <= 0 or host is None:
            return
        per_host, total, most = self._limits
        if size > most or self._held_total >= total or self._held.get(host, 0) >= per_host:
            return
        self._held[host] = self._held.get(host, 0) + 1
        self._held_total += 1
        try:
            await self._clock.sleep(wait)
        finally:
            self._held_total -= 1
            left = self._held.pop(host) - 1
            if left:
                self._held[host] = left

    @property
    def held(self) -> int:
        """Refusals waiting now."""
        return self._held_total

    @property
    def hosts(self) -> int:
        """How many hosts are remembered (each until its refusals are back within the burst)."""
        return len(self._due)

    def _forget(self, now: float) -> None:
        """Drop hosts whose pace has caught up; if that is not enough, the least recently
        refused (which then start again with a full burst: logged, it is a wide flood)."""
        for host in [host for host, due in self._due.items() if due <= now]:
            del self._due[host]
        while len(self._due) > self._max_hosts:
            del self._due[next(iter(self._due))]
            self._forgot += 1
            if self._forgot in (1, 100) or self._forgot % 10_000 == 0:
                log.warning("refusals come from more hosts than are tracked", forgotten=self._forgot)


def host_of(peer: str) -> str | None:
    """ "1.2.3.4" for "ipv4:1.2.3.4:5678" (or "ipv4:1.2.3.4"), the /64 for an IPv6 peer; None for
    a peer that is not a network address (the unix sockets: they are never refused)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.split(":", 1)[0]
    if kind == "ipv6":
        address = rest[1:].partition("]")[0] if rest.startswith("[") else rest
        try:
            ip = ipaddress.IPv6Address(address.split("%", 1)[0])
        except ValueError:
            return address or None
        if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack listener
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return None
