"""RefusalPacer: the first `burst` refusals of a host at once, then one per 1/rate seconds;
hosts apart (IPv6 by /64), unix peers never paced, and nothing kept once a host has caught up.
Time is a FakeClock: the rule is about seconds, the test takes none."""

from __future__ import annotations

import asyncio

import pytest

from opmasd.api.refusal_pacing import RefusalPacer, host_of
from opmasd.testing.clock import FakeClock


def test_a_burst_is_answered_at_once_then_refusals_are_paced() -> None:
    clock = FakeClock()
    pacer = RefusalPacer(clock, rate=10, burst=5)
    waits = [pacer.delay("ipv4:10.0.0.1:4000") for _ in range(8)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert waits[5:] == pytest.approx([0.1, 0.2, 0.3])  # one per 1/rate, queued one after another


def test_the_burst_comes_back_as_time_passes() -> None:
    clock = FakeClock()
    pacer = RefusalPacer(clock, rate=10, burst=5)
    for _ in range(5):
        pacer.delay("ipv4:10.0.0.1:1")
    clock.advance(0.3)  # three slots back
    assert [pacer.delay("ipv4:10.0.0.1:2") for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])
    clock.advance(60)
    assert pacer.delay("ipv4:10.0.0.1:3") == 0


def test_hosts_are_paced_apart_and_ports_do_not_matter() -> None:
    clock = FakeClock()
    pacer = RefusalPacer(clock, rate=1, burst=1)
    assert pacer.delay("ipv4:10.0.0.1:1") == 0
    assert pacer.delay("ipv4:10.0.0.1:2") == pytest.approx(1)  # same host, another connection
    assert pacer.delay("ipv4:10.0.0.2:1") == 0
    assert pacer.delay("ipv6:[2001:db8::1]:1") == 0
    assert pacer.delay("ipv6:[2001:db8::ffff]:9") == pytest.approx(1)  # the same /64
    assert pacer.delay("ipv6:[2001:db8:0:1::1]:1") == 0  # another /64


def test_unix_peers_are_never_paced() -> None:
    pacer = RefusalPacer(FakeClock(), rate=1, burst=1)
    assert all(pacer.delay("unix:") == 0 for _ in range(10))
    assert pacer.hosts == 0


def test_hosts_are_forgotten_once_caught_up_and_never_more_than_max() -> None:
    clock = FakeClock()
    pacer = RefusalPacer(clock, rate=10, burst=2, max_hosts=100)
    for i in range(100):
        pacer.delay(f"ipv4:10.0.{i // 256}.{i % 256}:1")
    assert pacer.hosts == 100
    clock.advance(1)
    pacer.delay("ipv4:10.1.0.0:1")  # over the bound: the caught-up hosts go
    assert pacer.hosts == 1
    for i in range(1000):  # a wide flood, all at once: the bound holds
        pacer.delay(f"ipv4:10.2.{i // 256}.{i % 256}:1")
    assert pacer.hosts == 100


async def test_pace_waits_for_the_slot() -> None:
    clock = FakeClock()
    pacer = RefusalPacer(clock, rate=2, burst=1)
    await pacer.pace("ipv4:10.0.0.1:1")  # within the burst: at once
    waiting = asyncio.ensure_future(pacer.pace("ipv4:10.0.0.1:1"))
    await asyncio.sleep(0)
    assert not waiting.done() and clock.sleepers == [pytest.approx(clock.monotonic() + 0.5)]
    clock.advance(0.5)
    await asyncio.wait_for(waiting, 1)


def test_host_of() -> None:
    assert host_of("ipv4:127.0.0.1:50051") == "127.0.0.1"
    assert host_of("ipv4:127.0.0.1") == "127.0.0.1"
    assert host_of("ipv6:[::1]:8000") == "::/64"
    assert host_of("ipv6:[fe80::1%eth0]:8000") == "fe80::/64"
    assert host_of("unix:") is None
    assert host_of("nats:") is None


async def test_what_waits_is_bounded_by_count_and_size() -> None:
    """A waiting refusal keeps its request in memory: past held_per_host (or held_total), or for
    a request larger than held_bytes, the refusal is answered at once instead."""
    clock = FakeClock()
    pacer = RefusalPacer(clock, rate=1, burst=1, held_per_host=2, held_total=3, held_bytes=100)
    await pacer.pace("ipv4:10.0.0.1:1")  # the burst
    waiting = [asyncio.ensure_future(pacer.pace("ipv4:10.0.0.1:1", 10)) for _ in range(2)]
    await asyncio.sleep(0)
    assert pacer.held == 2 and not any(w.done() for w in waiting)
    await asyncio.wait_for(pacer.pace("ipv4:10.0.0.1:1", 10), 1)  # a third of the host's: at once
    await pacer.pace("ipv4:10.0.0.2:1")  # another host's burst
    await asyncio.wait_for(pacer.pace("ipv4:10.0.0.2:1", 101), 1)  # too large to keep: at once
    other = asyncio.ensure_future(pacer.pace("ipv4:10.0.0.2:1", 100))
    await asyncio.sleep(0)
    assert pacer.held == 3  # the total bound reached
    await asyncio.wait_for(pacer.pace("ipv4:10.0.0.3:1"), 1)  # within a new host's burst
    await asyncio.wait_for(pacer.pace("ipv4:10.0.0.3:1"), 1)  # past it, but nothing more may wait
    clock.advance(60)
    await asyncio.wait_for(asyncio.gather(*waiting, other), 1)
    assert pacer.held == 0
