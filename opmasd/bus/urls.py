"""NATS server URLs: checking each server of nats.url, and whether they speak TLS."""

from __future__ import annotations

from opmasd.core.urls import split_server

SCHEMES = ("nats", "tls", "ws", "wss")


def check_url(server: str) -> None:
    """Refuse what nats-py would only fail on inside its (endless) connect loop."""
    try:
        parts = split_server(server)
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as exc:
        raise ValueError(f"bad NATS URL {server!r}: {exc}") from None
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"bad NATS URL {server!r}: want nats://host:port (or tls://, ws://, wss://)")


def uses_tls(servers: list[str]) -> bool:
    return any(s.startswith(("tls://", "wss://")) for s in servers)
