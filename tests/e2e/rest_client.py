"""A plain HTTP/1.1 client for the REST tests: what curl would send and see, nothing smarter."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .harness import Sandbox, free_port, sandbox


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Rest:
    """Requests to one opmasd's HTTP listener, on one kept-alive connection.

    token: an API token every request presents ("Authorization: Bearer <token>") unless it
    says otherwise (anonymous=True, or an Authorization header of its own); "" for none.
    ssl_context: HTTPS with it (a daemon with TLS); None: plain HTTP.
    """

    def __init__(
        self,
        address: str = "",
        socket_path: str = "",
        timeout: float = 15.0,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.socket_path = socket_path
        self.timeout = timeout
        self.token = token
        self.ssl_context = ssl_context
        self._conn: http.client.HTTPConnection | None = None

    def with_token(self, headers: dict[str, str], anonymous: bool = False) -> dict[str, str]:
        """headers, and the client's Authorization unless anonymous or they have their own."""
        if self.token and not anonymous and not any(k.lower() == "authorization" for k in headers):
            return {"Authorization": f"Bearer {self.token}", **headers}
        return headers

    def connection(self) -> http.client.HTTPConnection:
        if self.socket_path:
            return UnixHTTPConnection(self.socket_path, self.timeout)
        host, port = self.address.rsplit(":", 1)
        if self.ssl_context is not None:
            context = self.ssl_context
            return http.client.HTTPSConnection(host, int(port), timeout=self.timeout, context=context)
        return http.client.HTTPConnection(host, int(port), timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        anonymous: bool = False,
    ) -> Reply:
        """One request; anonymous: without the client's token."""
        if self._conn is None:
            self._conn = self.connection()
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        sent = {"Content-Type": "application/json"} if data is not None else {}
        sent.update(headers or {})
        self._conn.request(method, path, body=data, headers=self.with_token(sent, anonymous))
        response = self._conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        if response.will_close:
            self._conn.close()
            self._conn = None
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body=body if body is not None else {}, **kw)

    def stream(
        self, path: str, anonymous: bool = False
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A GET whose NDJSON body the test reads line by line (response.readline())."""
        conn = self.connection()
        conn.request("GET", path, headers=self.with_token({}, anonymous))
        return conn, conn.getresponse()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def rest_env(port: int, **extra: str) -> dict[str, str]:
    """A daemon's environment with REST on 127.0.0.1:port (the harness turns it off otherwise)."""
    return {
        "OPMAS_REST_ENABLED": "true",
        "OPMAS_REST_ADDRESS": f"127.0.0.1:{port}",
        "OPMAS_REST_MAX_BODY_BYTES": "64K",
        **extra,
    }


@contextlib.contextmanager
def rest_sandbox(name: str) -> Iterator[Sandbox]:
    """A sandbox whose running daemon serves REST; its port is the sandbox's rest_port."""
    port = free_port()
    with sandbox(name, env=rest_env(port)) as box:
        box.start()
        box.rest_port = port  # type: ignore[attr-defined]
        yield box


def rest_of(box: Sandbox, port: int | None = None, anonymous: bool = False) -> Rest:
    """A client of the sandbox's REST listener on TCP (its rest_port, or port), presenting the
    sandbox's admin token unless anonymous."""
    if port is None:
        port = int(box.rest_port)  # type: ignore[attr-defined]
    return Rest(f"127.0.0.1:{port}", token="" if anonymous else box.admin_token())
