"""How many TCP connections a listener holds, in all and per host: HostCaps.

Neither grpc nor aiohttp caps the connections of one host. A host (an IPv4 address, an IPv6
/64: api.refusal_pacing.host_of) may hold at most 1/`host_share` of a listener's `limit`, so
that one host holding connections open (idle, in a handshake, trickling bytes) cannot lock
every other out. What is past a cap is closed by the listener at once, unread.
"""

from __future__ import annotations

from collections import Counter

import structlog

log = structlog.get_logger(__name__)


class HostCaps:
    def __init__(self, limit: int, host_share: int, listener: str) -> None:
        self.limit = limit
        self.host_limit = max(1, limit // host_share)
        self._listener = listener
        self._per_host: Counter[str] = Counter()
        self.open = 0
        self._refused = 0

    def admit(self, host: str | None) -> bool:
        """Count a connection just accepted (until release), or refuse it: False, counted as
        refused (and logged now and then: a flood must not fill the log)."""
        if self.open >= self.limit or (host is not None and self._per_host[host] >= self.host_limit):
            self._refused += 1
            if self._refused in (1, 100) or self._refused % 10_000 == 0:
                log.warning(
                    "connection refused: too many open",
                    listener=self._listener,
                    host=host,
                    refused=self._refused,
                )
            return False
        self.open += 1
        if host is not None:
            self._per_host[host] += 1
        return True

    def release(self, host: str | None) -> None:
        self.open -= 1
        if host is not None:
            self._per_host[host] -= 1
            if self._per_host[host] <= 0:
                del self._per_host[host]

    @property
    def full(self) -> bool:
        return self.open >= self.limit

    def held_by(self, host: str) -> int:
        return self._per_host[host]
