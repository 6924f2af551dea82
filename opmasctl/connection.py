"""Finding opmasd, and the gRPC channel to it.

--server, else $OPMAS_SERVER: that address and only it. Otherwise the places a local daemon may
listen, in this order: what its configuration names (daemon_config: $OPMAS_CONFIG, else
/etc/opmas/opmasd.yaml), the default socket of a daemon run by this user (opmas.local), the
shipped unit's /run/opmas/opmasd.sock, then 127.0.0.1:50051. The first that takes a connection
is used; when none does, NoDaemon tells each place tried and why it failed. A `server:` in the
user's file (credentials) comes after --server and $OPMAS_SERVER, before that search.

Over TCP the channel is TLS for https://, for an address the daemon's configuration gives TLS, and
for any host:port when a CA or a client certificate is given (opmasctl.tls); a handshake that
fails is reported in one line that says why (Connection.tls_problem).

When a token is known (credentials: --token, $OPMAS_TOKEN, the user's file) and the daemon was
named (--server, $OPMAS_SERVER, `server:` in the user's file) at a TCP address, every call on the
channel, streams included, presents it as the metadata `authorization: Bearer <token>`. It is
never sent to a place the search found (any local user may listen on 127.0.0.1:50051 while the
daemon is away, or on a socket path a configuration names), nor to a unix socket, where the
daemon asks for none: see withheld().
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

import grpc

from opmas.local import DEFAULT_TCP_ADDRESS, SOCKET_NAME, SYSTEM_RUNTIME_DIR, default_socket_path
from opmas.v1 import agents_pb2_grpc, audit_pb2_grpc, tokens_pb2_grpc
from opmasctl.credentials import ClientTls, Token, Withheld
from opmasctl.daemon_config import ConfigProblem, Listener, read_daemon_config
from opmasctl.endpoints import Endpoint, can_probe, parse_server, probe, tcp_endpoint, unix_endpoint
from opmasctl.tls import channel_credentials, explain, uses_tls

__all__ = [
    "Connection",
    "Endpoint",
    "NoDaemon",
    "Search",
    "find_daemon",
    "parse_server",
    "probe",
    "resolve_endpoint",
    "withheld",
]

# After the configuration and the user's default socket: the shipped unit's socket, the default
# TCP listener.
FALLBACKS: tuple[tuple[Endpoint, str], ...] = (
    (unix_endpoint(str(SYSTEM_RUNTIME_DIR / SOCKET_NAME)), "the system daemon's socket"),
    (tcp_endpoint(DEFAULT_TCP_ADDRESS), "the default address"),
)
# grpc core's words for a connection that failed or broke (not a server's answer).
_TRANSPORT_WORDS = (
    "failed to connect to all addresses",
    "errors resolving",
    "DNS resolution failed",
    "Socket closed",
    "Connection reset",
)
# How to get a daemon to talk to, for the message that none answered.
START_HINT = (
    "start it: `make run` in a checkout, or `systemctl start opmasd`; "
    "or point --server (or $OPMAS_SERVER) at a running one"
)


@dataclass(frozen=True)
class Search:
    candidates: tuple[Listener, ...]
    # Named by --server or $OPMAS_SERVER: dialled as it is, never probed first.
    explicit: bool
    problem: ConfigProblem | None = None


class NoDaemon(Exception):
    """No place tried took a connection; `attempts` are (place, why) in the order tried."""

    def __init__(self, attempts: list[tuple[Listener, str]], problem: ConfigProblem | None = None) -> None:
        super().__init__("cannot reach opmasd")
        self.attempts = attempts
        self.problem = problem

    def report(self) -> str:
        """The lines for stderr: where it looked, why each failed, how to start a daemon."""
        if len(self.attempts) == 1:
            candidate, reason = self.attempts[0]
            lines = [f"error: cannot reach opmasd at {candidate.endpoint.display}: {reason}"]
        else:
            lines = ["error: cannot reach opmasd; tried, in order:"]
            lines += [
                f"  {candidate.endpoint.display} ({candidate.origin}): {reason}"
                for candidate, reason in self.attempts
            ]
        if self.problem is not None:
            lines.append(f"  (not used: {self.problem})")
        lines.append(f"  {START_HINT}")
        return "\n".join(lines) + "\n"


def find_daemon(
    server: str | None,
    env: Mapping[str, str] | None = None,
    euid: int | None = None,
    user_server: tuple[str, str] | None = None,
) -> Search:
    """Where to look for opmasd. ValueError: --server, $OPMAS_SERVER or `user_server` (the
    user's file's address and its origin) is not an address."""
    env = os.environ if env is None else env
    if server:
        return Search((Listener(parse_server(server), "--server"),), explicit=True)
    if env.get("OPMAS_SERVER"):
        return Search((Listener(parse_server(env["OPMAS_SERVER"]), "$OPMAS_SERVER"),), explicit=True)
    if user_server is not None:
        address, origin = user_server
        return Search((Listener(parse_server(address), origin),), explicit=True)
    config = read_daemon_config(env, euid=euid)
    candidates = list(config.listeners)
    # Where a daemon run by this user in this environment binds (opmas.local, the daemon's rule).
    candidates.append(Listener(unix_endpoint(str(default_socket_path(env, euid))), "the default socket"))
    candidates += [Listener(endpoint, origin) for endpoint, origin in FALLBACKS]
    unique = {candidate.endpoint.target: candidate for candidate in reversed(candidates)}
    ordered = tuple(c for c in candidates if unique[c.endpoint.target] is c)
    return Search(ordered, explicit=False, problem=config.problem)


def choose(search: Search) -> Listener:
    """The first place that takes a connection (an explicit one without trying). NoDaemon: none."""
    if search.explicit:
        return search.candidates[0]
    failures: list[tuple[Listener, str]] = []
    for candidate in search.candidates:
        reason = probe(candidate.endpoint)
        if reason is None:
            return candidate
        failures.append((candidate, reason))
    raise NoDaemon(failures, search.problem)


def resolve_endpoint(
    server: str | None,
    env: Mapping[str, str] | None = None,
    euid: int | None = None,
    user_server: tuple[str, str] | None = None,
) -> Endpoint:
    """The endpoint to dial, for callers that handle an unreachable daemon themselves: the
    first place that answers, else the last one tried."""
    search = find_daemon(server, env, euid, user_server)
    try:
        return choose(search).endpoint
    except NoDaemon:
        return search.candidates[-1].endpoint


def withheld(named: bool, endpoint: Endpoint) -> Withheld | None:
    """Why a token must not go to `endpoint` (named: by --server, $OPMAS_SERVER or the user's
    file, rather than found by the search); None: it may. A unix socket (a path, unix:,
    unix-abstract:) never gets one: the daemon asks for none there, and a socket in the place of
    its own would keep it."""
    if endpoint.is_unix:
        return "unix"
    if not named:
        return "unnamed"
    return None


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to the metadata of every call on the channel.

    Call credentials would do it too, but grpc sends those only over TLS or a local channel,
    and a daemon's TCP listener is often plaintext on loopback.
    """

    def __init__(self, token: Token) -> None:
        self._metadata = token.metadata()

    def _details(self, details: grpc.ClientCallDetails) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    endpoint: Endpoint, token: Token | None = None, tls: ClientTls | None = None
) -> grpc.Channel:
    """CredentialError: a TLS file cannot be used."""
    # A fleet-wide list can outgrow the 4 MiB default.
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if uses_tls(endpoint, tls):
        credentials = channel_credentials(tls)
        channel = grpc.secure_channel(endpoint.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(endpoint.target, options=options)
    return channel if token is None else grpc.intercept_channel(channel, BearerToken(token))


class Connection:
    """The AgentService, TokenService and AuditService stubs on a channel to the daemon, opened at
    first use: a command refused for its arguments never looks for a daemon. With a token, every
    call on the channel presents it, unless the place dialled must not get it (withheld). An
    Endpoint given instead of a Search counts as named, like --server. `tls`: the CA and client
    certificate for a TCP server (opmasctl.tls)."""

    def __init__(
        self,
        where: Endpoint | Search,
        on_problem: Callable[[ConfigProblem], None] | None = None,
        token: Token | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        if isinstance(where, Endpoint):
            where = Search((Listener(where, "--server"),), explicit=True)
        self.search = where
        self.token = token
        self.tls = tls
        self._on_problem = on_problem
        self._chosen: Listener | None = None
        self._channel: grpc.Channel | None = None
        self._stub: agents_pb2_grpc.AgentServiceStub | None = None
        self._tokens: tokens_pb2_grpc.TokenServiceStub | None = None
        self._audit: audit_pb2_grpc.AuditServiceStub | None = None

    @property
    def chosen(self) -> Listener:
        """The place dialled; NoDaemon when the search finds none."""
        if self._chosen is None:
            problem = self.search.problem
            if problem is not None and problem.loud and self._on_problem is not None:
                self._on_problem(problem)
            self._chosen = choose(self.search)
        return self._chosen

    @property
    def endpoint(self) -> Endpoint:
        return self.chosen.endpoint

    @property
    def withheld(self) -> Withheld | None:
        """Why the token known is not sent to the place dialled; None: it is, or there is none."""
        if self.token is None:
            return None
        return withheld(self.search.explicit, self.endpoint)

    @property
    def sent_token(self) -> Token | None:
        """The token the calls present: the one known, unless it is withheld."""
        return self.token if self.withheld is None else None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = open_channel(self.endpoint, self.sent_token, self.tls)
        return self._channel

    @property
    def stub(self) -> agents_pb2_grpc.AgentServiceStub:
        if self._stub is None:
            self._stub = agents_pb2_grpc.AgentServiceStub(self.channel)
        return self._stub

    @property
    def tokens(self) -> tokens_pb2_grpc.TokenServiceStub:
        if self._tokens is None:
            self._tokens = tokens_pb2_grpc.TokenServiceStub(self.channel)
        return self._tokens

    @property
    def audit(self) -> audit_pb2_grpc.AuditServiceStub:
        if self._audit is None:
            self._audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        return self._audit

    def unreachable(self, err: grpc.RpcError) -> NoDaemon | None:
        """The daemon could not be reached (rather than answered with an error), and why.

        grpc gives both the same code (UNAVAILABLE, or DEADLINE_EXCEEDED while connecting) and
        no mark of who said it. So an error counts as "not reached" only when its words are
        grpc's own for a failed or lost connection (a server's message such as "opmasd is
        shutting down" or "failed to connect to NATS" is its answer, reported as such), and a
        plain connect, tried on this error path only, fails too. (Watching the channel's
        connectivity instead needs grpc's polling thread, which raises into stderr when the
        channel closes under it.)
        """
        if self._chosen is None or not isinstance(err, grpc.Call):
            return None
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            if details and not any(words in details for words in _TRANSPORT_WORDS):
                return None
        elif code != grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
        endpoint = self._chosen.endpoint
        if can_probe(endpoint):
            reason = probe(endpoint)
        else:
            reason = details if code == grpc.StatusCode.UNAVAILABLE else None
        return NoDaemon([(self._chosen, reason)]) if reason is not None else None

    def tls_problem(self, err: grpc.RpcError) -> str | None:
        """One line for a connection that failed because of TLS (a certificate not trusted, a
        plaintext server, a client certificate missing or refused, a TLS server dialled in
        plaintext), naming the server; None when TLS is not why."""
        if self._chosen is None or not isinstance(err, grpc.Call):
            return None
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        endpoint = self._chosen.endpoint
        reason = explain(err.details() or "", endpoint, self.tls)
        return f"error: cannot talk to opmasd at {endpoint.display}: {reason}" if reason else None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
