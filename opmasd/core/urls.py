"""Credentials out of URLs: the one rule for what a log line or a message may show of a URL.

`redacted` keeps the user and hides the password (for logs and errors about a database or
NATS URL); `without_credentials` drops both (what agents are told as their NATS_URL). Both
take a comma-separated list of servers as nats.url allows.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit


def split_servers(url: str) -> list[str]:
    """The servers of a URL that may list several, comma-separated (a NATS cluster)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def split_server(server: str) -> SplitResult:
    """One server's URL, parsed; "host:port" alone means nats://host:port, as nats-py reads it."""
    return urlsplit(server if "://" in server else f"nats://{server}")


def redacted(url: str) -> str:
    """The URL with any password shown as ***; the rest, user included, as it was."""
    out = []
    for server in url.split(","):
        try:
            parts = urlsplit(server)
            password = parts.password
        except ValueError:
            # Unparseable: show nothing after a possible user:password@ rather than leak it.
            out.append(server.rsplit("@", 1)[-1] if "@" in server else server)
            continue
        if password is None:
            out.append(server)
            continue
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        out.append(parts._replace(netloc=f"{user}:***@{host}").geturl())
    return ",".join(out)


def without_credentials(url: str) -> str:
    """The URL(s) with any user:password@ removed."""
    out = []
    for server in split_servers(url):
        parts = split_server(server)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        out.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return ",".join(out)
