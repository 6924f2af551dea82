"""opmasctl's credentials: where the token comes from (--token, $OPMAS_TOKEN, the user's file),
that every call carries it (unary, futures, streams, top's channel, completion), how the file
is refused, the hints for UNAUTHENTICATED and PERMISSION_DENIED, and that no message shows it.

A real in-process gRPC server on a free TCP port records the metadata of every call.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl import completion, credentials
from opmasctl.cli import run
from opmasctl.credentials import CredentialError, read_user_config, user_config_path
from opmasctl.endpoints import tcp_endpoint
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
    for name in ("OPMAS_TOKEN", "OPMAS_SERVER", "OPMAS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture
def daemon() -> Iterator[tuple[str, Agents]]:
    fake = Agents()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    agents_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        server.stop(None)


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
        ("server: 127.0.0.1:9\ntokne: x\n", "unknown key 'tokne'; the keys are server and token"),
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
    assert run(["--server", address, "--token", TOKEN, "agents", "list"]) == 0
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
