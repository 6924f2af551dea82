"""opmasctl's credentials: where the token comes from (--token, $OPMAS_TOKEN, the user's file),
that every call carries it (unary, futures, streams, top's channel, completion), that it goes
only to a server named (--server, $OPMAS_SERVER, `server:`) over TCP, never to one the search
found nor to a unix socket, how the file is refused, the hints for UNAUTHENTICATED and
PERMISSION_DENIED, that no message shows it, and that a daemon configuration others may have
written is not believed.

A real in-process gRPC server on a free TCP port (or a unix socket) records the metadata of
every call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl import completion, connection, credentials
from opmasctl.cli import run
from opmasctl.connection import Connection, find_daemon
from opmasctl.credentials import CredentialError, read_user_config, user_config_path
from opmasctl.daemon_config import read_daemon_config
from opmasctl.endpoints import parse_server, tcp_endpoint, unix_endpoint
from opmasctl.top_feed import Link

TOKEN = "opmas_0123456789abcdef_Fl4gS3cr3tFromFlag"
ENV_TOKEN = "opmas_1111111111111111_Env5ecretValue"
FILE_TOKEN = "opmas_2222222222222222_F1leSecretValue"
SECRETS = (TOKEN, ENV_TOKEN, FILE_TOKEN)
Handler = Callable[[Any, grpc.ServicerContext], Any]


class Agents(agents_pb2_grpc.AgentServiceServicer):
    """Records (method, authorization metadata or None) of every call; answers from handlers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.handlers: dict[str, Handler] = {}

    def _answer(self, name: str, request: Any, context: grpc.ServicerContext, default: Any) -> Any:
        metadata = dict(context.invocation_metadata())
        self.calls.append((name, metadata.get("authorization")))  # type: ignore[arg-type]
        handler = self.handlers.get(name)
        return handler(request, context) if handler else default

    def ListAgents(self, request, context):  # type: ignore[no-untyped-def]
        agents = [agents_pb2.Agent(agent_id="alpha"), agents_pb2.Agent(agent_id="beta")]
        return self._answer("ListAgents", request, context, agents_pb2.ListAgentsResponse(agents=agents))

    def GetAgentStatus(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("GetAgentStatus", request, context, agents_pb2.AgentStatus(agent_id="alpha"))

    def GetAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("GetAgent", request, context, agents_pb2.Agent(agent_id=request.agent_id))

    def DeleteAgent(self, request, context):  # type: ignore[no-untyped-def]
        reply = agents_pb2.DeleteAgentResponse(agent_id=request.agent_id, deleted=True)
        return self._answer("DeleteAgent", request, context, reply)

    def GetAgentLogs(self, request, context):  # type: ignore[no-untyped-def]
        lines = iter([agents_pb2.LogLine(agent_id=request.agent_id, line="hello")])
        return self._answer("GetAgentLogs", request, context, lines)

    def WatchEvents(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("WatchEvents", request, context, iter([agents_pb2.AgentEvent(agent_id="alpha")]))

    def sent(self) -> set[str | None]:
        """The authorization values the calls carried."""
        return {auth for _, auth in self.calls}


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token or server from the caller's environment; the user's file under tmp_path."""
    for name in (
        "OPMAS_TOKEN",
        "OPMAS_SERVER",
        "OPMAS_CONFIG",
        "OPMAS_GRPC_SOCKET",
        "OPMAS_GRPC_ADDRESS",
        "OPMAS_SERVICE_RUNTIME_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@contextlib.contextmanager
def serve(address: str = "127.0.0.1:0") -> Iterator[tuple[str, Agents]]:
    """A fake daemon at `address` (a free TCP port by default, or `unix:...`): its address for
    --server (host:port, or what was given), and its record of calls."""
    fake = Agents()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    agents_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    port = server.add_insecure_port(address)
    server.start()
    try:
        yield (f"127.0.0.1:{port}" if address == "127.0.0.1:0" else address), fake
    finally:
        server.stop(None)


@pytest.fixture
def daemon() -> Iterator[tuple[str, Agents]]:
    with serve() as found:
        yield found


def user_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "config" / "opmas" / "opmasctl.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def no_secret_in(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
            assert secret.rsplit("_", 1)[1] not in text


# --- where the token comes from -----------------------------------------------------------


def test_token_from_the_flag(daemon: tuple[str, Agents], capsys: pytest.CaptureFixture[str]) -> None:
    address, fake = daemon
    assert run(["--server", address, "--token", TOKEN, "agents", "list"]) == 0
    assert fake.calls == [("ListAgents", f"Bearer {TOKEN}")]
    # After the subcommand too, like every global option.
    assert run(["agents", "list", "--server", address, "--token", TOKEN]) == 0
    assert fake.sent() == {f"Bearer {TOKEN}"}
    no_secret_in(*capsys.readouterr())


def test_token_from_the_environment(
    daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    assert run(["--server", address, "agents", "list"]) == 0
    assert fake.calls == [("ListAgents", f"Bearer {ENV_TOKEN}")]


def test_token_and_server_from_the_file(tmp_path: Path, daemon: tuple[str, Agents]) -> None:
    address, fake = daemon
    user_file(tmp_path, f"# opmasctl\nserver: {address}\ntoken: {FILE_TOKEN}\n")
    assert run(["agents", "list"]) == 0
    assert fake.calls == [("ListAgents", f"Bearer {FILE_TOKEN}")]


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [(True, True, TOKEN), (False, True, ENV_TOKEN), (False, False, FILE_TOKEN)],
)
def test_precedence_flag_env_file(
    flag: bool,
    env: bool,
    expected: str,
    tmp_path: Path,
    daemon: tuple[str, Agents],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, fake = daemon
    user_file(tmp_path, f"token: {FILE_TOKEN}\n")
    if env:
        monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    argv = ["--server", address, *(["--token", TOKEN] if flag else []), "agents", "list"]
    assert run(argv) == 0
    assert fake.sent() == {f"Bearer {expected}"}


def test_server_precedence_flag_env_file(
    tmp_path: Path, daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, fake = daemon
    # Port 1 on loopback: nothing listens there. The file's server comes after the other two.
    user_file(tmp_path, "server: 127.0.0.1:1\n")
    assert run(["--server", address, "agents", "list"]) == 0
    monkeypatch.setenv("OPMAS_SERVER", address)
    assert run(["agents", "list"]) == 0
    assert len(fake.calls) == 2


def test_no_token_sends_no_authorization(tmp_path: Path, daemon: tuple[str, Agents]) -> None:
    address, fake = daemon
    user_file(tmp_path, f"server: {address}\n", mode=0o644)  # no token: others may read it
    assert run(["agents", "list"]) == 0
    assert run(["--server", address, "agents", "list"]) == 0
    assert fake.sent() == {None}


def test_every_call_carries_it_streams_and_futures_too(
    daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    base = ["--server", address]
    assert run([*base, "agents", "logs", "alpha", "-f"]) == 0
    assert run([*base, "agents", "logs", "alpha", "beta", "-f"]) == 0  # a thread per stream
    assert run([*base, "agents", "watch", "alpha"]) == 0
    assert run([*base, "agents", "delete", "alpha", "beta"]) == 0  # concurrent futures
    methods = {method for method, _ in fake.calls}
    assert {"GetAgentLogs", "WatchEvents", "GetAgentStatus", "DeleteAgent", "ListAgents"} <= methods
    assert fake.sent() == {f"Bearer {ENV_TOKEN}"}
    no_secret_in(*capsys.readouterr())


def test_top_channel_carries_it_after_a_reconnect_too(daemon: tuple[str, Agents]) -> None:
    address, fake = daemon
    token = credentials.check_token(TOKEN, "--token")
    link = Link(tcp_endpoint(address), 5.0, token)
    try:
        link.unary(lambda stub: stub.ListAgents, agents_pb2.ListAgentsRequest(), 5.0)
        link.reconnect()
        assert [
            e.agent_id for e in link.stream(lambda stub: stub.WatchEvents, agents_pb2.WatchEventsRequest())
        ]
    finally:
        link.close()
    assert fake.calls == [("ListAgents", f"Bearer {TOKEN}"), ("WatchEvents", f"Bearer {TOKEN}")]


def test_completion_asks_with_the_token(daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch) -> None:
    address, fake = daemon
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    ids = completion.agent_ids(
        prefix="al",
        action=argparse.Action([], "agent_id"),
        parsed_args=argparse.Namespace(server=address, token=TOKEN),
    )
    assert ids == ["alpha"]
    assert fake.calls == [("ListAgents", f"Bearer {TOKEN}")]


# --- the user's file ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_file_others_may_read_is_refused(
    mode: int, tmp_path: Path, daemon: tuple[str, Agents], capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    path = user_file(tmp_path, f"token: {FILE_TOKEN}\n", mode)
    assert run(["--server", address, "agents", "list"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path} has mode {mode:04o}" in err
    assert f"chmod 600 {path}" in err
    assert fake.calls == []  # refused before any call
    no_secret_in(out, err)


def test_a_file_others_may_write_is_refused_even_without_a_token(
    tmp_path: Path, daemon: tuple[str, Agents], capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    path = user_file(tmp_path, f"server: {address}\n", 0o664)
    assert run(["--token", TOKEN, "agents", "list"]) == 2
    err = capsys.readouterr().err
    assert f"{path} has mode 0664, which lets other users change it" in err
    assert f"chmod 600 {path}" in err
    assert fake.calls == []
    no_secret_in(err)


def test_a_file_not_of_this_user_is_refused(tmp_path: Path) -> None:
    path = user_file(tmp_path, "server: 127.0.0.1:9\n")
    other = os.geteuid() + 1
    with pytest.raises(CredentialError, match=rf"owned by uid {os.geteuid()}, not by you \(uid {other}\)"):
        read_user_config(path, euid=other)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: 127.0.0.1:9\ntokne: x\n", "unknown key 'tokne'; the keys are server, token, ca, cert"),
        (f"{FILE_TOKEN}:\n", "unknown key (not shown: it looks like a token"),
        (f"{FILE_TOKEN}\n", "not a mapping of keys"),
        (f"token: {FILE_TOKEN}\n  x: [\n", "invalid YAML at line"),
        (f"token: !{FILE_TOKEN} x\n", "invalid YAML"),
        ("token: [a, b]\n", "token: must be a string"),
        ("token: 'has space'\n", "that is not a token"),
        ("server: 127.0.0.1:9\n" + "#" * 70_000 + "\n", "larger than 64 KiB"),
    ],
)
def test_a_bad_file_is_a_usage_error_naming_it(
    text: str,
    message: str,
    tmp_path: Path,
    daemon: tuple[str, Agents],
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = daemon
    path = user_file(tmp_path, text)
    assert run(["--server", address, "agents", "list"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err
    assert fake.calls == []
    no_secret_in(err)


def test_a_bad_server_in_the_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = user_file(tmp_path, "server: ftp://x:1\n")
    assert run(["agents", "list"]) == 2
    assert f"`server:` in {path}: 'ftp://x:1': unsupported scheme" in capsys.readouterr().err


def test_the_file_is_not_read_when_flags_give_both(tmp_path: Path, daemon: tuple[str, Agents]) -> None:
    address, fake = daemon
    user_file(tmp_path, "nonsense: 1\n")
    # http:// says plaintext: the file's TLS settings (ca, cert, key) are not wanted either.
    assert run(["--server", f"http://{address}", "--token", TOKEN, "agents", "list"]) == 0
    assert fake.sent() == {f"Bearer {TOKEN}"}


def test_the_file_path(tmp_path: Path) -> None:
    assert user_config_path({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/h"}) == Path("/x/cfg/opmas/opmasctl.yaml")
    # A relative XDG_CONFIG_HOME is ignored (XDG base directory spec).
    for env in ({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}, {"HOME": "/h"}):
        assert user_config_path(env) == Path("/h/.config/opmas/opmasctl.yaml")
    # An empty file, or none at all, sets nothing.
    assert read_user_config(tmp_path / "absent.yaml").token is None
    empty = user_file(tmp_path, "", 0o644)
    assert stat.S_IMODE(empty.stat().st_mode) == 0o644
    assert read_user_config(empty).server is None


@pytest.mark.parametrize("value", ["", "  ", "two words", "t\u00f6ken"])
def test_a_bad_token_flag_is_a_usage_error_that_does_not_echo_it(
    value: str, daemon: tuple[str, Agents], capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    assert run(["--server", address, "--token", value, "agents", "list"]) == 2
    err = capsys.readouterr().err
    assert "--token: " in err
    if value.strip():
        assert value not in err
    assert fake.calls == []


def test_the_token_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    user_file(tmp_path, f"token: {FILE_TOKEN}\n")
    assert run(["--help"]) == 0
    assert run(["agents", "list", "--help"]) == 0
    assert run(["--token", TOKEN, "agents", "nosuch"]) == 2
    assert run(["--token", TOKEN, "--server", "127.0.0.1:1", "--timeout", "5", "agents", "list"]) == 4
    assert run(["--token", TOKEN, "--server", str(tmp_path / "absent.sock"), "agents", "list"]) == 4
    found = credentials.resolve(None, None)
    assert found.token is not None and found.token.secret == ENV_TOKEN
    no_secret_in(*capsys.readouterr(), repr(found), str(found))


# --- what a refusal says ------------------------------------------------------------------


def _refuse(code: grpc.StatusCode, message: str) -> Handler:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return handler


def test_unauthenticated_without_a_token_says_how_to_give_one(
    tmp_path: Path, daemon: tuple[str, Agents], capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    fake.handlers["ListAgents"] = _refuse(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid credentials")
    assert run(["--server", address, "agents", "list"]) == 5
    path = tmp_path / "config" / "opmas" / "opmasctl.yaml"
    assert capsys.readouterr().err.splitlines() == [
        "error: unauthenticated: missing or invalid credentials",
        f"  this daemon needs a token over TCP: give --token, $OPMAS_TOKEN or `token:` in {path}; "
        "`opmasctl tokens create` on the daemon's host makes one",
    ]


def test_unauthenticated_with_a_token_names_where_it_came_from(
    daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    fake.handlers["WatchEvents"] = _refuse(grpc.StatusCode.UNAUTHENTICATED, "token revoked")
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    assert run(["--server", address, "agents", "watch"]) == 5
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == "error: unauthenticated: token revoked"
    assert "did not accept the token from $OPMAS_TOKEN" in err
    no_secret_in(out, err)


def test_permission_denied_says_the_role_is_too_low(
    daemon: tuple[str, Agents], capsys: pytest.CaptureFixture[str]
) -> None:
    address, fake = daemon
    fake.handlers["DeleteAgent"] = _refuse(grpc.StatusCode.PERMISSION_DENIED, "needs the admin role")
    assert run(["--server", address, "--token", TOKEN, "agents", "delete", "alpha"]) == 5
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "error: permission_denied: needs the admin role",
        "  the token's role does not allow this (the token from --token)",
    ]
    no_secret_in(out, err)


def test_help_documents_exit_status_5(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  5    not allowed:" in out
    assert "visible to other users in `ps`" in " ".join(out.split())


# --- where the token goes: only to a server named, over TCP --------------------------------


def searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str, via: str) -> Path:
    """No server named: the search finds the fake daemon at `address`, named by the daemon's
    configuration (`via` "config") or as the default address ("default"); every other place it
    tries is dead. The configuration file's path."""
    config = tmp_path / "opmasd.yaml"
    named = address if via == "config" else "''"
    config.write_text(f"grpc:\n  socket: none\n  address: {named}\n")
    monkeypatch.setenv("OPMAS_CONFIG", str(config))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "no-run"))  # the default socket
    default = address if via == "default" else "127.0.0.1:1"
    fallbacks = (
        (unix_endpoint(str(tmp_path / "no-system.sock")), "the system daemon's socket"),
        (tcp_endpoint(default), "the default address"),
    )
    monkeypatch.setattr(connection, "FALLBACKS", fallbacks)
    return config


@pytest.mark.parametrize("via", ["default", "config"])
@pytest.mark.parametrize("source", ["env", "flag", "file"])
def test_a_place_found_by_searching_gets_no_token(
    via: str,
    source: str,
    tmp_path: Path,
    daemon: tuple[str, Agents],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whoever listens on 127.0.0.1:50051 while the daemon is away (or where a configuration
    says) must not collect the token."""
    address, fake = daemon
    searched(tmp_path, monkeypatch, address, via)
    argv = ["agents", "list"]
    if source == "env":
        monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    elif source == "flag":
        argv = ["--token", TOKEN, *argv]
    else:
        user_file(tmp_path, f"token: {FILE_TOKEN}\n")
    assert run(argv) == 0
    assert fake.calls == [("ListAgents", None)]
    no_secret_in(*capsys.readouterr())


@pytest.mark.parametrize("how", ["--server", "http://", "$OPMAS_SERVER", "server:"])
def test_a_server_named_over_tcp_gets_the_token(
    how: str, tmp_path: Path, daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, fake = daemon
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    argv = ["agents", "list"]
    if how == "--server":
        argv = ["--server", address, *argv]
    elif how == "http://":
        argv = ["--server", f"http://{address}", *argv]
    elif how == "$OPMAS_SERVER":
        monkeypatch.setenv("OPMAS_SERVER", address)
    else:
        user_file(tmp_path, f"server: {address}\n")
    assert run(argv) == 0
    assert fake.calls == [("ListAgents", f"Bearer {ENV_TOKEN}")]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short folder for sockets: pytest's tmp_path may pass the 107 bytes a socket path has."""
    with tempfile.TemporaryDirectory(prefix="opmasctl-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.mark.parametrize(
    "form", ["unix:///path", "/path", "unix:path", "unix-abstract:", "$OPMAS_SERVER", "server:"]
)
def test_a_unix_socket_never_gets_the_token(
    form: str,
    tmp_path: Path,
    socket_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The daemon asks for none on its socket, and a socket in the place of its own would keep it."""
    path = socket_dir / "opmasd.sock"
    if form == "unix-abstract:":
        listen = server = f"unix-abstract:opmasctl-test-{uuid.uuid4().hex}"
    else:
        listen = f"unix:{path}"
        server = {"unix:///path": f"unix://{path}", "unix:path": f"unix:{path}"}.get(form, str(path))
    argv = ["--token", TOKEN, "agents", "list"]
    if form == "$OPMAS_SERVER":
        monkeypatch.setenv("OPMAS_SERVER", server)
    elif form == "server:":
        user_file(tmp_path, f"server: {server}\n")
    else:
        argv = ["--server", server, *argv]
    with serve(listen) as (_, fake):
        assert run(argv) == 0
    assert fake.calls == [("ListAgents", None)]
    no_secret_in(*capsys.readouterr())


@pytest.mark.parametrize(
    ("named", "server", "expected"),
    [
        (True, "127.0.0.1:50051", None),
        (True, "https://opmasd.example", None),
        (True, "dns:///opmasd.example:50051", None),
        (False, "127.0.0.1:50051", "unnamed"),
        (True, "/run/opmas/opmasd.sock", "unix"),
        (True, "unix:///run/opmas/opmasd.sock", "unix"),
        (True, "unix-abstract:opmasd", "unix"),
        (False, "/run/opmas/opmasd.sock", "unix"),
    ],
)
def test_withheld(named: bool, server: str, expected: str | None) -> None:
    assert connection.withheld(named, parse_server(server)) == expected


def test_a_connection_from_a_search_withholds_it(
    tmp_path: Path, daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What top's channel is given (Connection.sent_token) follows the same rule."""
    address, _ = daemon
    token = credentials.check_token(TOKEN, "--token")
    searched(tmp_path, monkeypatch, address, "default")
    with Connection(find_daemon(None), token=token) as found:
        assert (found.endpoint.target, found.withheld, found.sent_token) == (address, "unnamed", None)
    with Connection(find_daemon(address), token=token) as named:
        assert (named.withheld, named.sent_token) == (None, token)


def test_completion_sends_no_token_to_a_place_found_by_searching(
    tmp_path: Path, daemon: tuple[str, Agents], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, fake = daemon
    searched(tmp_path, monkeypatch, address, "default")
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    ids = completion.agent_ids(
        prefix="",
        action=argparse.Action([], "agent_id"),
        parsed_args=argparse.Namespace(server=None, token=None),
    )
    assert ids == ["alpha", "beta"]
    assert fake.calls == [("ListAgents", None)]


def test_completion_of_no_daemon_is_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    searched(tmp_path, monkeypatch, "127.0.0.1:1", "default")
    action = argparse.Action([], "agent_id")
    assert completion.agent_ids(prefix="", action=action, parsed_args=argparse.Namespace()) == []
    assert capsys.readouterr() == ("", "")


def test_unauthenticated_with_a_token_withheld_says_to_name_the_server(
    tmp_path: Path,
    daemon: tuple[str, Agents],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = daemon
    searched(tmp_path, monkeypatch, address, "default")
    fake.handlers["ListAgents"] = _refuse(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid credentials")
    monkeypatch.setenv("OPMAS_TOKEN", ENV_TOKEN)
    assert run(["agents", "list"]) == 5
    path = tmp_path / "config" / "opmas" / "opmasctl.yaml"
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "error: unauthenticated: missing or invalid credentials",
        "  this daemon needs a token over TCP; the token from $OPMAS_TOKEN was not sent, as no "
        "server was named: a token goes only to a daemon named by --server host:port, "
        f"$OPMAS_SERVER or `server:` in {path}",
    ]
    assert fake.calls == [("ListAgents", None)]
    no_secret_in(out, err)


def test_permission_denied_with_a_token_withheld_says_so(
    tmp_path: Path,
    daemon: tuple[str, Agents],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, fake = daemon
    searched(tmp_path, monkeypatch, address, "config")
    fake.handlers["DeleteAgent"] = _refuse(grpc.StatusCode.PERMISSION_DENIED, "needs the admin role")
    assert run(["--token", TOKEN, "agents", "delete", "alpha"]) == 5
    err = capsys.readouterr().err
    assert (
        "  the caller's role does not allow this (the token from --token was not sent, "
        "as no server was named: " in err
    )
    assert "--server host:port" in err


def test_unauthenticated_on_a_unix_socket_says_the_token_goes_only_over_tcp(
    socket_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = socket_dir / "opmasd.sock"
    with serve(f"unix:{path}") as (_, fake):
        fake.handlers["ListAgents"] = _refuse(grpc.StatusCode.UNAUTHENTICATED, "who are you")
        assert run(["--server", str(path), "--token", TOKEN, "agents", "list"]) == 5
    assert capsys.readouterr().err.splitlines()[1] == (
        "  this daemon needs a token over TCP; the token from --token was not sent: "
        "a token goes only over TCP, never to a unix socket"
    )


# --- a daemon configuration others may have written ---------------------------------------


def _nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def owned(path: Path, owner: str) -> int:
    """Makes `path` root's, "you"'s or an "other" user's; the euid that is "you" for it."""
    me = os.geteuid()
    if me != 0:
        if owner == "root":
            pytest.skip("only root can give a file to root")
        return me if owner == "you" else me + 1
    you = 1000 if _nobody() != 1000 else 1001
    os.chown(path, {"root": 0, "you": you, "other": _nobody()}[owner], -1)
    return you


@pytest.mark.parametrize(
    ("owner", "mode", "believed"),
    [
        ("root", 0o644, True),
        ("root", 0o640, True),
        ("root", 0o664, True),  # the opmas group's to edit: its members are trusted with the daemon
        ("you", 0o666, True),
        ("other", 0o644, True),
        ("other", 0o600, True),
        ("other", 0o664, False),
        ("other", 0o646, False),
        ("other", 0o666, False),
    ],
)
def test_a_daemon_config_others_may_write_is_not_believed(
    owner: str, mode: int, believed: bool, tmp_path: Path
) -> None:
    path = tmp_path / "opmasd.yaml"
    path.write_text("grpc:\n  socket: /tmp/elsewhere.sock\n  address: 127.0.0.1:6000\n")
    path.chmod(mode)
    euid = owned(path, owner)
    config = read_daemon_config({"OPMAS_CONFIG": str(path)}, euid=euid)
    if believed:
        assert config.problem is None
        assert [lst.endpoint.target for lst in config.listeners] == [
            "unix:/tmp/elsewhere.sock",
            "127.0.0.1:6000",
        ]
    else:
        assert config.listeners == []
        assert config.problem is not None and config.problem.loud
        writers = {0o664: "its group", 0o646: "all users", 0o666: "its group and all users"}[mode]
        assert config.problem.reason == (
            f"owned by uid {path.stat().st_uid} (neither root nor you, uid {euid}) and writable by "
            f"{writers} (mode {mode:04o}): whoever may change it could point opmasctl at a daemon "
            "of their own"
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_run_warns_of_a_group_writable_config_of_another_user_and_ignores_it(
    tmp_path: Path,
    daemon: tuple[str, Agents],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, real = daemon
    with serve() as (liar_address, liar):
        config = searched(tmp_path, monkeypatch, address, "default")
        config.write_text(f"grpc:\n  socket: none\n  address: {liar_address}\n")
        config.chmod(0o664)
        os.chown(config, _nobody(), -1)
        assert run(["agents", "list"]) == 0
    assert liar.calls == [] and len(real.calls) == 1
    out, err = capsys.readouterr()
    assert "alpha" in out
    assert err.splitlines() == [
        f"opmasctl: warning: ignoring {config}: owned by uid {_nobody()} (neither root nor you, "
        "uid 0) and writable by its group (mode 0664): whoever may change it could point opmasctl "
        "at a daemon of their own"
    ]
