"""How opmasctl finds opmasd: --server's syntax, the daemon's configuration, the order of places
tried, and what it says when none answers."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from opmas.local import DEFAULT_TCP_ADDRESS
from opmasctl import connection
from opmasctl.cli import run
from opmasctl.connection import NoDaemon, choose, find_daemon, resolve_endpoint
from opmasctl.daemon_config import MAX_CONFIG_BYTES, read_daemon_config
from opmasctl.endpoints import can_probe, parse_server, probe, tcp_endpoint, unix_endpoint

# --- --server and $OPMAS_SERVER ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "target", "display", "secure"),
    [
        ("/run/opmas/opmasd.sock", "unix:/run/opmas/opmasd.sock", "/run/opmas/opmasd.sock", False),
        ("unix:///run/x.sock", "unix:/run/x.sock", "/run/x.sock", False),
        ("unix:/run/x.sock", "unix:/run/x.sock", "/run/x.sock", False),
        ("localhost:50051", "localhost:50051", "localhost:50051", False),
        ("10.0.0.5:7000", "10.0.0.5:7000", "10.0.0.5:7000", False),
        ("[::1]:50051", "[::1]:50051", "[::1]:50051", False),
        ("dns:///opmasd.example:50051", "dns:///opmasd.example:50051", "dns:///opmasd.example:50051", False),
        # http(s):// is host:port: plaintext, or TLS; without a port the scheme's own.
        ("http://127.0.0.1:50271", "127.0.0.1:50271", "http://127.0.0.1:50271", False),
        ("http://127.0.0.1:50271/", "127.0.0.1:50271", "http://127.0.0.1:50271", False),
        ("HTTPS://opmasd.example:8443", "opmasd.example:8443", "https://opmasd.example:8443", True),
        ("https://opmasd.example", "opmasd.example:443", "https://opmasd.example:443", True),
        ("https://[::1]:8443", "[::1]:8443", "https://[::1]:8443", True),
    ],
)
def test_parse_server(server: str, target: str, display: str, secure: bool) -> None:
    endpoint = parse_server(server)
    assert (endpoint.target, endpoint.display, endpoint.secure) == (target, display, secure)


def test_parse_server_relative_socket_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_server("./d.sock").target == f"unix:{tmp_path}/d.sock"
    assert parse_server("unix:d.sock").target == f"unix:{tmp_path}/d.sock"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("", "empty"),
        ("justahost", "neither a socket path nor host:port"),
        ("unix://relative/x.sock", "absolute path"),
        ("ftp://host:21", "unsupported scheme ftp://"),
        ("tcp://127.0.0.1:50051", "unsupported scheme tcp://"),
        ("http://host:80/api", "without a path"),
        ("http://user@host:80", "credentials"),
        ("host:99999", "port"),
        ("host:http", "port"),
        ("::1:50051", "brackets"),
    ],
)
def test_parse_server_rejects(server: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_server(server)


def test_http_server_is_not_taken_for_a_socket_path(capsys: pytest.CaptureFixture[str]) -> None:
    """The bug this fixes: `--server http://127.0.0.1:50271` dialled ./http:/127.0.0.1:50271."""
    assert run(["--server", "http://127.0.0.1:1", "--timeout", "5", "agents", "list"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach opmasd at http://127.0.0.1:1: connection refused\n"), err


def test_bad_server_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(["--server", "ftp://x:1", "agents", "list"]) == 2
    assert "--server: 'ftp://x:1': unsupported scheme ftp://" in capsys.readouterr().err
    monkeypatch.setenv("OPMAS_SERVER", "gopher://x:1")
    assert run(["agents", "list"]) == 2
    assert "$OPMAS_SERVER: 'gopher://x:1': unsupported scheme" in capsys.readouterr().err


def test_probe_needs_a_socket_address() -> None:
    dns = parse_server("dns:///opmasd.example:50051")
    assert not can_probe(dns) and probe(dns) is None


def test_flag_beats_env() -> None:
    env = {"OPMAS_SERVER": "envhost:1"}
    assert resolve_endpoint("flaghost:2", env, 1000).target == "flaghost:2"
    assert resolve_endpoint(None, env, 1000).target == "envhost:1"
    search = find_daemon(None, env, 1000)
    assert search.explicit and [c.origin for c in search.candidates] == ["$OPMAS_SERVER"]


# --- the daemon's configuration ---------------------------------------------------------------


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that takes connections (nobody answers gRPC on it; probing only connects)."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "opmasd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(8)
        yield path


def _config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "opmasd.yaml"
    path.write_text(text)
    return {"OPMAS_CONFIG": str(path), "RUNTIME_DIRECTORY": str(tmp_path / "default-run")}


def test_config_socket_and_address_come_first(tmp_path: Path) -> None:
    env = _config(tmp_path, "grpc:\n  socket: sub/d.sock\n  address: 0.0.0.0:6000\nnats: {url: ''}\n")
    search = find_daemon(None, env, 1000)
    assert [(c.endpoint.target, c.origin) for c in search.candidates] == [
        (f"unix:{tmp_path}/sub/d.sock", f"grpc.socket in {tmp_path}/opmasd.yaml"),  # relative to the file
        ("127.0.0.1:6000", f"grpc.address in {tmp_path}/opmasd.yaml"),  # any-address: loopback
        (f"unix:{tmp_path}/default-run/opmasd.sock", "the default socket"),
        ("unix:/run/opmas/opmasd.sock", "the system daemon's socket"),
        (DEFAULT_TCP_ADDRESS, "the default address"),
    ]
    assert search.problem is None and not search.explicit


def test_the_viewer_socket_is_tried_after_the_admin_socket(tmp_path: Path) -> None:
    """A user outside the sockets' group is refused by the admin socket: the viewers' socket
    the daemon's configuration names is next (reads work there)."""
    env = _config(tmp_path, "grpc:\n  socket: /run/o/d.sock\n  viewer_socket: v.sock\n  address: ''\n")
    targets = [c.endpoint.target for c in find_daemon(None, env, 1000).candidates]
    assert targets[:2] == ["unix:/run/o/d.sock", f"unix:{tmp_path}/v.sock"]
    env["OPMAS_GRPC_VIEWER_SOCKET"] = "none"
    assert f"unix:{tmp_path}/v.sock" not in [
        c.endpoint.target for c in find_daemon(None, env, 1000).candidates
    ]


def test_config_runtime_dir_none_and_env_overrides(tmp_path: Path) -> None:
    env = _config(tmp_path, "service:\n  runtime_dir: /srv/run\ngrpc:\n  address: '[::]:7000'\n")
    listeners = read_daemon_config(env).listeners
    assert [lst.endpoint.target for lst in listeners] == ["unix:/srv/run/opmasd.sock", "[::1]:7000"]
    env = _config(tmp_path, "grpc:\n  socket: none\n  address: ''\n")
    assert read_daemon_config(env).listeners == []
    # The daemon's own OPMAS_<SECTION>_<KEY> overrides win over the file, as for the daemon.
    env["OPMAS_GRPC_SOCKET"] = "/elsewhere/x.sock"
    env["OPMAS_GRPC_ADDRESS"] = "127.0.0.2:7001"
    listeners = read_daemon_config(env).listeners
    assert [(lst.endpoint.target, lst.origin) for lst in listeners] == [
        ("unix:/elsewhere/x.sock", "$OPMAS_GRPC_SOCKET"),
        ("127.0.0.2:7001", "$OPMAS_GRPC_ADDRESS"),
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("grpc: [unclosed\n", "invalid YAML: line 2: expected"),
        ("- a list\n", "not a mapping of sections"),
        ("grpc: 5\n", "grpc: not a mapping of keys"),
        ("grpc:\n  socket: 5\n", "grpc.socket: not a string"),
        ("grpc:\n  address: nowhere\n", "not host:port"),
    ],
)
def test_a_broken_config_is_reported_and_skipped(tmp_path: Path, text: str, reason: str) -> None:
    config = read_daemon_config(_config(tmp_path, text))
    assert config.problem is not None and config.problem.loud
    assert reason in config.problem.reason


def test_config_too_large_missing_or_not_a_file(tmp_path: Path) -> None:
    env = _config(tmp_path, "#" * (MAX_CONFIG_BYTES + 1))
    assert "larger than" in str(read_daemon_config(env).problem)
    missing = read_daemon_config({"OPMAS_CONFIG": str(tmp_path / "nope.yaml")}).problem
    assert missing is not None and missing.loud and "no such file" in missing.reason
    os.mkfifo(tmp_path / "fifo.yaml")  # must not hang
    fifo = read_daemon_config({"OPMAS_CONFIG": str(tmp_path / "fifo.yaml")}).problem
    assert fifo is not None and "not a regular file" in fifo.reason


def test_an_unreadable_default_config_is_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/etc/opmas/opmasd.yaml may be the opmas group's only: not worth a warning at every run,
    only a line of the report when no daemon answers."""
    path = tmp_path / "opmasd.yaml"
    path.write_text("grpc: {socket: /x.sock}\n")

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    problem = read_daemon_config({}, default=path).problem
    assert problem is not None and not problem.loud and "permission denied" in problem.reason


# --- choosing, and telling when nothing answers -------------------------------------------------


def test_the_first_place_that_answers_is_used(tmp_path: Path, listening: Path) -> None:
    env = _config(tmp_path, f"grpc:\n  socket: {tmp_path}/dead.sock\n  address: 127.0.0.1:1\n")
    (tmp_path / "dead.sock").touch()  # a file, not a listening socket
    env["RUNTIME_DIRECTORY"] = str(listening.parent)
    chosen = choose(find_daemon(None, env, 1000))
    assert (chosen.endpoint.target, chosen.origin) == (f"unix:{listening}", "the default socket")
    assert resolve_endpoint(None, env, 1000).target == f"unix:{listening}"


@pytest.fixture
def nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed places are this machine's: make them dead ones for the test."""
    monkeypatch.setattr(
        connection,
        "FALLBACKS",
        (
            (unix_endpoint("/nonexistent/opmas/opmasd.sock"), "the system daemon's socket"),
            (tcp_endpoint("127.0.0.1:1"), "the default address"),
        ),
    )


@pytest.mark.usefixtures("nothing_else")
def test_no_daemon_lists_every_place_tried(tmp_path: Path) -> None:
    env = _config(tmp_path, f"grpc:\n  socket: {tmp_path}/from-config.sock\n")
    with pytest.raises(NoDaemon) as caught:
        choose(find_daemon(None, env, 1000))
    assert caught.value.report().splitlines() == [
        "error: cannot reach opmasd; tried, in order:",
        f"  {tmp_path}/from-config.sock (grpc.socket in {tmp_path}/opmasd.yaml): no such socket",
        f"  {tmp_path}/default-run/opmasd.sock (the default socket): no such socket",
        "  /nonexistent/opmas/opmasd.sock (the system daemon's socket): no such socket",
        "  127.0.0.1:1 (the default address): connection refused",
        "  start it: `make run` in a checkout, or `systemctl start opmasd`; "
        "or point --server (or $OPMAS_SERVER) at a running one",
    ]


@pytest.mark.usefixtures("nothing_else")
def test_run_without_a_daemon_exits_4_and_warns_of_a_broken_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in _config(tmp_path, "grpc: [broken\n").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OPMAS_SERVER", raising=False)
    assert run(["agents", "list"]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"opmasctl: warning: ignoring {tmp_path}/opmasd.yaml: invalid YAML")
    assert lines[1] == "error: cannot reach opmasd; tried, in order:"
    assert lines[-2].startswith(f"  (not used: {tmp_path}/opmasd.yaml: invalid YAML")
    assert "make run" in lines[-1] and "systemctl start opmasd" in lines[-1] and "--server" in lines[-1]


@pytest.mark.usefixtures("nothing_else")
def test_usage_errors_come_before_looking_for_a_daemon(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPMAS_SERVER", raising=False)
    monkeypatch.setenv("OPMAS_CONFIG", "/nonexistent/opmasd.yaml")
    assert run(["agents", "register", "--name", "x"]) == 2
    assert "cannot reach" not in capsys.readouterr().err
