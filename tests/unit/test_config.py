from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

import opmasd
from opmas.units import parse_duration, parse_size
from opmasd.app import manager_settings
from opmasd.config import (
    Config,
    ConfigError,
    default_agent_dirs,
    default_paths,
    load_config,
)
from opmasd.config import loading as config_loading
from opmasd.config.parsers import parse_mode, split_address
from opmasd.core.model import RestartPolicy

USER_ENV = {"HOME": "/home/op", "XDG_STATE_HOME": "/home/op/.state", "XDG_RUNTIME_DIR": "/run/user/1000"}


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The machine's own /etc/opmas/opmasd.yaml must not leak into these tests.
    monkeypatch.setattr(config_loading, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "opmasd.yaml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "opmasd.yaml"
    path.write_text(textwrap.dedent(text))
    path.chmod(0o600)  # as a file holding a secret must be
    return path


def error_of(path: Path | None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {}, euid=1000)
    return info.value


# --- defaults ------------------------------------------------------------------------------


def test_defaults_without_any_file_as_user() -> None:
    cfg = load_config(None, USER_ENV, euid=1000)
    assert isinstance(cfg, Config)
    assert cfg.source is None
    s = cfg.service
    assert s.node == socket.gethostname()
    assert s.state_dir == Path("/home/op/.state/opmas")
    assert s.runtime_dir == Path("/run/user/1000/opmas")
    assert s.log_dir == Path("/home/op/.state/opmas/logs")
    assert (s.log_level, s.log_format) == ("info", "auto")
    assert (s.discovery_interval, s.monitoring_interval, s.cleanup_interval) == (60, 5, 3600)
    assert s.stop_agents_on_shutdown is True
    assert cfg.database.url == "sqlite:////home/op/.state/opmas/opmas.db"
    assert cfg.database.pool_size == 5
    n = cfg.nats
    assert (n.url, n.user, n.password, n.tls_verify, n.subject_prefix, n.heartbeat_timeout) == (
        "",
        "",
        "",
        True,
        "agent",
        90,
    )
    g = cfg.grpc
    assert g.socket == Path("/run/user/1000/opmas/opmasd.sock")
    assert (g.socket_mode, g.address, g.grace_period) == (0o660, "127.0.0.1:50051", 5)
    assert (cfg.rest.address, cfg.rest.enabled) == ("127.0.0.1:8000", True)
    a = cfg.agents
    assert a.dirs == default_agent_dirs()
    assert (a.autostart, a.stop_timeout, a.restart_policy) == (False, 10, RestartPolicy.ON_FAILURE)
    assert (a.backoff_initial, a.backoff_max, a.stable_after, a.max_restarts) == (0.5, 30, 10, 5)
    assert (a.log_max_bytes, a.log_backups) == (10 * 1024 * 1024, 3)


def test_password_is_not_in_repr() -> None:
    env = {
        **USER_ENV,
        "OPMAS_NATS_URL": "nats://n:4222",
        "OPMAS_NATS_USER": "u",
        "OPMAS_NATS_PASSWORD": "s3cret",
    }
    cfg = load_config(None, env, euid=1000)
    assert cfg.nats.password == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_default_agent_dirs_in_a_checkout() -> None:
    checkout = Path(opmasd.__file__).resolve().parent.parent / "agents" / "packages"
    assert checkout.is_dir()  # this test runs from the repository
    assert default_agent_dirs() == (checkout,)


def test_default_paths_as_root() -> None:
    paths = default_paths({}, euid=0)
    assert paths.state_dir == Path("/var/lib/opmas")
    assert paths.runtime_dir == Path("/run/opmas")
    assert paths.log_dir == Path("/var/log/opmas")
    cfg = load_config(None, {}, euid=0)
    assert cfg.grpc.socket == Path("/run/opmas/opmasd.sock")
    assert cfg.database.url == "sqlite:////var/lib/opmas/opmas.db"


def test_default_paths_from_systemd_directories() -> None:
    env = {
        "STATE_DIRECTORY": "/var/lib/opmas:/var/lib/other",
        "RUNTIME_DIRECTORY": "/run/opmas",
        "LOGS_DIRECTORY": "/var/log/opmas",
    }
    paths = default_paths(env, euid=998)
    assert (paths.state_dir, paths.runtime_dir, paths.log_dir) == (
        Path("/var/lib/opmas"),
        Path("/run/opmas"),
        Path("/var/log/opmas"),
    )


def test_default_paths_user_fallbacks() -> None:
    paths = default_paths({"HOME": "/home/op", "XDG_STATE_HOME": "relative/ignored"}, euid=1000)
    assert paths.state_dir == Path("/home/op/.local/state/opmas")
    assert paths.runtime_dir == Path("/tmp/opmas-1000")
    assert paths.log_dir == Path("/home/op/.local/state/opmas/logs")


def test_log_dir_follows_a_configured_state_dir(tmp_path: Path) -> None:
    path = write(tmp_path, "service:\n  state_dir: /srv/opmas\n")
    cfg = load_config(path, USER_ENV, euid=1000)
    assert cfg.service.log_dir == Path("/srv/opmas/logs")
    assert cfg.database.url == "sqlite:////srv/opmas/opmas.db"


# --- a full file ---------------------------------------------------------------------------

FULL = """\
service:
  node: edge-1
  state_dir: state            # relative: to the file's folder
  runtime_dir: /run/o
  log_dir: /var/log/o
  log_level: DEBUG
  log_format: json
  discovery_interval: 5m
  monitoring_interval: 500ms
  cleanup_interval: 1h
  stop_agents_on_shutdown: no
database:
  url: postgresql://opmas:pw@db/opmas
  pool_size: 20
  commit_timeout: 2500ms
nats:
  url: tls://a:4222,tls://b:4222
  user: opmas
  password: "0123"
  tls_verify: off
  subject_prefix: site-1.agent
  heartbeat_timeout: 2m
grpc:
  socket: /run/o/api.sock
  socket_mode: "0600"
  address: "[::1]:50052"
  grace_period: 0
rest:
  address: 0.0.0.0:8080
  enabled: false
auth:
  enabled: false
  unsafe_allow_unauthenticated: yes
  socket_group: ""
agents:
  dirs: [/opt/agents, more]
  autostart: yes
  stop_timeout: 30s
  restart_policy: always
  backoff_initial: 1
  backoff_max: 1m
  stable_after: 1m30s
  max_restarts: 0
  log_max_bytes: 512K
  log_backups: 0
"""


def test_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load_config(path, {"HOME": "/home/op"}, euid=1000)
    assert cfg.source == path
    s = cfg.service
    assert s.node == "edge-1"
    assert s.state_dir == tmp_path.resolve() / "state"
    assert (s.runtime_dir, s.log_dir) == (Path("/run/o"), Path("/var/log/o"))
    assert (s.log_level, s.log_format) == ("debug", "json")
    assert (s.discovery_interval, s.monitoring_interval, s.cleanup_interval) == (300, 0.5, 3600)
    assert s.stop_agents_on_shutdown is False
    assert cfg.database.url == "postgresql://opmas:pw@db/opmas"
    assert cfg.database.pool_size == 20
    assert cfg.database.commit_timeout == 2.5
    assert manager_settings(cfg).commit_timeout == 2.5  # and the manager is given it
    n = cfg.nats
    assert (n.url, n.user, n.password, n.tls_verify) == (
        "tls://a:4222,tls://b:4222",
        "opmas",
        "0123",
        False,
    )
    assert (n.subject_prefix, n.heartbeat_timeout) == ("site-1.agent", 120)
    g = cfg.grpc
    assert (g.socket, g.socket_mode, g.address, g.grace_period) == (
        Path("/run/o/api.sock"),
        0o600,
        "[::1]:50052",
        0,
    )
    assert (cfg.rest.address, cfg.rest.enabled) == ("0.0.0.0:8080", False)
    assert (cfg.auth.enabled, cfg.auth.unsafe_allow_unauthenticated, cfg.auth.socket_group) == (
        False,
        True,
        "",
    )
    a = cfg.agents
    assert a.dirs == (Path("/opt/agents"), tmp_path.resolve() / "more")
    assert (a.autostart, a.stop_timeout, a.restart_policy) == (True, 30, RestartPolicy.ALWAYS)
    assert (a.backoff_initial, a.backoff_max, a.stable_after) == (1, 60, 90)
    assert (a.max_restarts, a.log_max_bytes, a.log_backups) == (0, 512 * 1024, 0)


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing\n"), USER_ENV, euid=1000).agents.max_restarts == 5
    cfg = load_config(write(tmp_path, "auth:\nnats:\n  url:\n"), USER_ENV, euid=1000)
    assert cfg.nats.url == ""


def test_disabling_listeners(tmp_path: Path) -> None:
    path = write(tmp_path, 'grpc:\n  socket: none\n  address: ""\nrest:\n  address: ""\n')
    cfg = load_config(path, USER_ENV, euid=1000)
    assert (cfg.grpc.socket, cfg.grpc.address, cfg.rest.address) == (None, None, None)


def test_socket_mode_forms(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted 0660 as octal already.
    assert (
        load_config(write(tmp_path, "grpc:\n  socket_mode: 0660\n"), {}, euid=1000).grpc.socket_mode == 0o660
    )
    assert (
        load_config(write(tmp_path, "grpc:\n  socket_mode: '660'\n"), {}, euid=1000).grpc.socket_mode == 0o660
    )


def test_default_file_is_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "agents:\n  max_restarts: 9\n")
    monkeypatch.setattr(config_loading, "DEFAULT_CONFIG_PATH", path)
    cfg = load_config(None, {}, euid=1000)
    assert (cfg.agents.max_restarts, cfg.source) == (9, path)


# --- bad input -----------------------------------------------------------------------------


def test_explicit_missing_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "nope.yaml")
    assert str(err) == f"{tmp_path / 'nope.yaml'}: no such file"


def test_the_example_message(tmp_path: Path) -> None:
    path = write(tmp_path, "agents:\n  max_restarts: lots\n")
    err = error_of(path)
    assert str(err) == f"{path}: agents.max_restarts: must be an integer >= 0, got 'lots'"
    assert (err.source, err.key) == (str(path), "agents.max_restarts")


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("service", "node", "'a b'", "must be a node name"),
        ("service", "node", "12", "must be a string"),
        ("service", "state_dir", "''", "must be a non-empty path"),
        ("service", "log_level", "loud", "must be one of debug, info, warning, error"),
        ("service", "log_format", "xml", "must be one of auto, console, json, journal"),
        ("service", "discovery_interval", "0", "must be a duration > 0"),
        ("service", "monitoring_interval", "-1", "must be a duration > 0"),
        ("service", "cleanup_interval", "soon", "must be a duration > 0"),
        ("service", "stop_agents_on_shutdown", "maybe", "must be a boolean"),
        ("database", "url", "mysql://x/y", "must be a URL with a scheme in sqlite"),
        ("database", "url", "/var/db.sqlite", "must be a URL"),
        ("database", "pool_size", "0", "must be an integer >= 1"),
        ("database", "pool_size", "2.5", "must be an integer >= 1"),
        ("database", "commit_timeout", "0", "must be a duration > 0"),
        ("nats", "url", "http://x:4222", "must be a URL with a scheme in nats"),
        ("nats", "tls_verify", "2", "must be a boolean"),
        ("nats", "subject_prefix", "agent.*", "must be NATS subject tokens"),
        ("nats", "subject_prefix", "a..b", "must be NATS subject tokens"),
        ("nats", "heartbeat_timeout", "[1]", "must be a duration > 0"),
        ("grpc", "socket_mode", "660", "must be an octal mode"),
        ("grpc", "socket_mode", "'0999'", "must be an octal mode"),
        ("grpc", "address", "localhost", 'must be "host:port"'),
        ("grpc", "address", "localhost:70000", "port between 0 and 65535"),
        ("grpc", "address", "::1:80", "IPv6 host in brackets"),
        ("grpc", "grace_period", "-1s", "must be a duration >= 0"),
        ("rest", "address", "8000", 'must be a "host:port" string, got 8000'),
        ("rest", "enabled", "'sure'", "must be a boolean"),
        ("auth", "tokens_file", "{a: 1}", "must be a string"),
        ("agents", "dirs", "7", "must be a list of paths"),
        ("agents", "dirs", "[/a, 3]", "must be a list of non-empty paths"),
        ("agents", "stop_timeout", "1x", "must be a duration >= 0"),
        ("agents", "restart_policy", "sometimes", "must be one of never, on-failure, always"),
        ("agents", "max_restarts", "-1", "must be an integer >= 0"),
        ("agents", "log_max_bytes", "0", "must be a size in bytes > 0"),
        ("agents", "log_max_bytes", "10 parsecs", "must be a size in bytes > 0"),
        ("agents", "log_backups", "true", "must be an integer >= 0"),
    ],
)
def test_bad_values_name_file_key_and_reason(
    tmp_path: Path, section: str, key: str, value: str, reason: str
) -> None:
    path = write(tmp_path, f"{section}:\n  {key}: {value}\n")
    err = error_of(path)
    assert str(err).startswith(f"{path}: {section}.{key}: must ")
    assert reason in str(err)
    assert err.key == f"{section}.{key}"


def test_database_url_is_not_echoed(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "database:\n  url: mysql://root:hunter2@db/x\n"))
    assert "hunter2" not in str(err)
    assert "'mysql'" in str(err)


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "agents:\n  backoff_initial: 10\n  backoff_max: 5\n"))
    assert err.key == "agents.backoff_max"
    assert "must be >= agents.backoff_initial" in str(err)
    # Only the initial value given: it is the one to blame.
    err = error_of(write(tmp_path, "agents:\n  backoff_initial: 1m\n"))
    assert err.key == "agents.backoff_initial"


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "agents:\n  stop_timout: 5\n")
    err = error_of(path)
    assert str(err) == f"{path}: agents.stop_timout: unknown key (did you mean 'stop_timeout'?)"


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "agent:\n  autostart: true\n")
    assert str(error_of(path)) == f"{path}: agent: unknown section (did you mean 'agents'?)"
    path = write(tmp_path, "zzz: 1\n")
    assert str(error_of(path)) == f"{path}: zzz: unknown section"


def test_top_level_and_section_must_be_mappings(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert str(error_of(path)) == f"{path}: must be a mapping of sections, got list"
    path = write(tmp_path, "rest: 5\n")
    assert str(error_of(path)) == f"{path}: rest: must be a mapping of keys, got int"


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "service:\n  node: a\n  log_level: [info\nagents:\n  autostart: true\n")
    err = error_of(path)
    # PyYAML notices the unclosed "[" of line 3 where the next mapping key starts.
    assert str(err).startswith(f"{path}: line 4, column 7: expected ',' or ']'")


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path, "agents:\n  autostart: true\nrest:\n  enabled: false\nagents:\n  max_restarts: 1\n"
    )
    assert str(error_of(path)) == f"{path}: line 5, column 1: duplicate key 'agents'"


def test_a_directory_or_fifo_is_not_a_configuration_file(tmp_path: Path) -> None:
    assert str(error_of(tmp_path)) == f"{tmp_path}: not a regular file"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert str(error_of(fifo)) == f"{fifo}: not a regular file"  # refused, not read forever


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "agents: {}\n")
    path.chmod(0)
    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 0")
    assert "cannot read" in str(error_of(path))


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, "# x\n" * 300_000)
    assert str(error_of(path)) == f"{path}: larger than 1024 KiB: not a configuration file"


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "opmasd.yaml"
    path.write_bytes(b"agents: {}\n# \xff\n")
    assert str(error_of(path)) == f"{path}: not UTF-8 text (byte 13)"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("nats:\n  url: nats://n:4222\n  user: u\n  password: s3cret\n", "nats.password"),
        ("nats:\n  url: nats://n:4222\n  token: s3cret\n", "nats.token"),
        ("nats:\n  url: nats://u:s3cret@n:4222\n", "nats.url"),
        ("database:\n  url: postgresql://u:s3cret@db/opmas\n", "database.url"),
    ],
)
def test_a_world_readable_file_holding_a_secret_is_refused(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path, text)
    path.chmod(0o644)
    message = str(error_of(path))
    assert message == (
        f"{path}: holds a secret ({named}) and is readable by every user (mode 0644): "
        "make it chmod 0640 (group opmas) or 0600"
    )
    assert "s3cret" not in message
    path.chmod(0o640)  # group-readable is how the packages install it
    load_config(path, {})


def test_a_world_readable_file_without_secrets_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "nats:\n  url: nats://n:4222\ndatabase:\n  url: postgresql://u@db/opmas\n")
    path.chmod(0o644)
    assert load_config(path, {}).nats.url == "nats://n:4222"


# --- environment ---------------------------------------------------------------------------


def test_env_overrides_of_each_type(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc:\n  address: 127.0.0.1:1\nagents:\n  max_restarts: 1\n")
    env = {
        **USER_ENV,
        "OPMAS_GRPC_ADDRESS": "0.0.0.0:50051",  # address, over the file
        "OPMAS_AUTH_UNSAFE_ALLOW_PLAINTEXT_REMOTE": "yes",  # (which that address needs)
        "OPMAS_AGENTS_MAX_RESTARTS": "7",  # int, over the file
        "OPMAS_AGENTS_DIRS": "/a:/b,/c",  # path list
        "OPMAS_AGENTS_AUTOSTART": "on",  # bool
        "OPMAS_AGENTS_STOP_TIMEOUT": "250ms",  # duration
        "OPMAS_AGENTS_LOG_MAX_BYTES": "1G",  # size
        "OPMAS_AGENTS_RESTART_POLICY": "never",  # choice
        "OPMAS_GRPC_SOCKET_MODE": "640",  # octal mode
        "OPMAS_DATABASE_URL": "postgresql+asyncpg://u@h/db",  # url
        "OPMAS_SERVICE_STATE_DIR": "/srv/state",  # path
        "OPMAS_NATS_USER": "me",  # string
        "OPMAS_NATS_PASSWORD": "pw",  # (which a user needs)
        "OPMAS_NATS_URL": "nats://n:4222",  # (the login is for an external server)
        "OPMAS_REST_ADDRESS": "",  # empty disables
        # Not ours: other sections and OPMAS_CONFIG are left alone.
        "OPMAS_CONFIG": "/x.yaml",
        "OPMAS_SERVER": "unix:///x",
        "OPMAS_TEST_POSTGRES_URL": "postgresql://x",
    }
    cfg = load_config(path, env, euid=1000)
    assert cfg.grpc.address == "0.0.0.0:50051"
    assert cfg.agents.max_restarts == 7
    assert cfg.agents.dirs == (Path("/a"), Path("/b"), Path("/c"))
    assert cfg.agents.autostart is True
    assert cfg.agents.stop_timeout == 0.25
    assert cfg.agents.log_max_bytes == 1 << 30
    assert cfg.agents.restart_policy is RestartPolicy.NEVER
    assert cfg.grpc.socket_mode == 0o640
    assert cfg.database.url == "postgresql+asyncpg://u@h/db"
    assert cfg.service.state_dir == Path("/srv/state")
    assert cfg.service.log_dir == Path("/srv/state/logs")
    assert cfg.nats.user == "me"
    assert cfg.rest.address is None


def test_env_relative_path_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {**USER_ENV, "OPMAS_AGENTS_DIRS": "pkgs"}, euid=1000)
    assert cfg.agents.dirs == (tmp_path / "pkgs",)


def test_safe_defaults(tmp_path: Path) -> None:
    auth = load_config(write(tmp_path, ""), USER_ENV, euid=1000).auth
    assert (auth.enabled, auth.unsafe_allow_unauthenticated, auth.unsafe_allow_plaintext_remote) == (
        True,
        False,
        False,
    )
    assert auth.socket_group is None  # "opmas" where it exists (api.grpc_server.socket_gid)


@pytest.mark.parametrize(
    ("text", "env", "named", "says"),
    [
        ("auth:\n  tokens_file: /etc/opmas/tokens\n", {}, "auth.tokens_file", "kept in the database"),
        ("auth:\n  enabled: false\n", {}, "auth.enabled", "unsafe_allow_unauthenticated"),
        ("", {"OPMAS_AUTH_ENABLED": "no"}, "OPMAS_AUTH_ENABLED", "unsafe_allow_unauthenticated"),
        ("grpc:\n  address: 0.0.0.0:50051\n", {}, "grpc.address", "unsafe_allow_plaintext_remote"),
        ("rest:\n  address: 192.168.1.5:8000\n", {}, "rest.address", "not a loopback address"),
        ("", {"OPMAS_REST_ADDRESS": "[::]:8000"}, "OPMAS_REST_ADDRESS", "not a loopback address"),
        ("grpc:\n  address: myhost.example:50051\n", {}, "grpc.address", "not a loopback address"),
        ("auth:\n  socket_group: no-such-group-here\n", {}, "auth.socket_group", "no group"),
    ],
)
def test_settings_that_would_open_the_control_plane_are_refused(
    tmp_path: Path, text: str, env: dict[str, str], named: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        load_config(write(tmp_path, text), {**USER_ENV, **env}, euid=1000)
    assert raised.value.key == named


@pytest.mark.parametrize(
    "text",
    [
        "grpc:\n  address: 127.0.0.2:50051\nrest:\n  address: localhost:8000\n",
        "grpc:\n  address: '[::1]:50051'\n",
        "rest:\n  address: 0.0.0.0:8000\n  enabled: false\n",  # no listener: nothing to refuse
        "grpc:\n  address: 0.0.0.0:50051\nauth:\n  unsafe_allow_plaintext_remote: true\n",
        "auth:\n  enabled: false\n  unsafe_allow_unauthenticated: true\n",
        "auth:\n  socket_group: root\n",
    ],
)
def test_safe_or_explicitly_unsafe_settings_are_accepted(tmp_path: Path, text: str) -> None:
    load_config(write(tmp_path, text), USER_ENV, euid=1000)


def test_env_bad_value_names_the_variable() -> None:
    err = error_of(None, {"OPMAS_AGENTS_MAX_RESTARTS": "lots"})
    assert str(err) == "environment: OPMAS_AGENTS_MAX_RESTARTS: must be an integer >= 0, got 'lots'"


def test_env_unknown_key_in_known_section() -> None:
    err = error_of(None, {"OPMAS_AGENTS_STOP_TIMOUT": "5"})
    assert err.key == "OPMAS_AGENTS_STOP_TIMOUT"
    assert str(err) == (
        "environment: OPMAS_AGENTS_STOP_TIMOUT: unknown variable (did you mean 'OPMAS_AGENTS_STOP_TIMEOUT'?)"
    )


# --- value parsers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (10, 10.0),
        (1.5, 1.5),
        ("10", 10.0),
        ("2.5", 2.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        (" 10S ", 10.0),
        ("0", 0.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(positive=False)(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10x", "-5s", "5s-", "inf", "nan", "1e999", True, None, "1 2s"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(positive=False)(text)


def test_positive_duration_rejects_zero() -> None:
    with pytest.raises(ValueError, match="> 0"):
        parse_duration(positive=True)("0s")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1, 1),
        ("1024", 1024),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("10MiB", 10 << 20),
        ("10MB", 10 << 20),
        ("10 M", 10 << 20),
        ("1G", 1 << 30),
        ("1.5K", 1536),
        ("100B", 100),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [0, -1, "0", "0.5", "1.5", "1.7K", "", "K", "10X", True, 2.0])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match="must be a size"):
        parse_size(text)


def test_modes() -> None:
    assert parse_mode("0660") == parse_mode("660") == parse_mode("0o660") == parse_mode(0o660) == 0o660
    with pytest.raises(ValueError):
        parse_mode(660)  # decimal 660 is 0o1224: the unquoted-YAML trap


def test_split_address() -> None:
    assert split_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert split_address("[::]:0") == ("::", 0)
    assert split_address("localhost:65535") == ("localhost", 65535)
    for bad in ("localhost", ":80", "h:", "h:-1", "h:65536", "[]:80"):
        with pytest.raises(ValueError):
            split_address(bad)


# --- the systemd runtime ---------------------------------------------------------------------


def test_systemd_runtime_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "agents:\n  runtime: systemd\n  systemd: required\n  systemd_bus: unix:path=/x\n")
    agents = load_config(path, {}).agents
    assert (agents.runtime.value, agents.systemd, agents.systemd_bus) == (
        "systemd",
        "required",
        "unix:path=/x",
    )


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("runtime: systemd", "agents.runtime", "systemd, but agents.systemd is off: it would be ignored"),
        (
            "systemd_bus: unix:path=/x",
            "agents.systemd_bus",
            "given, but agents.systemd is off: it would be ignored",
        ),
        ("systemd_journal: /j", "agents.systemd_journal", "given, but agents.systemd is off"),
        ("runtime: container", "agents.runtime", "must be one of"),
    ],
)
def test_what_only_the_systemd_runtime_reads_is_refused_with_it_off(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, f"agents:\n  systemd: off\n  {text}\n")  # YAML's off: False
    err = error_of(path)
    assert err.key == key and reason in err.reason, err


def test_default_agent_dirs_installed_take_the_shipped_agents_from_one_place(tmp_path: Path) -> None:
    shipped = tmp_path / "site-packages" / "opmasd" / "shipped_agents"
    shipped.mkdir(parents=True)
    installed = tmp_path / "lib"  # no agents/packages: not a checkout
    assert default_agent_dirs(installed, shipped) == (shipped, Path("/etc/opmas/agents.d"))
    # An install that puts them in /usr/lib/opmas/agents instead: that one, never both.
    absent = tmp_path / "absent"
    assert default_agent_dirs(installed, absent) == (
        Path("/usr/lib/opmas/agents"),
        Path("/etc/opmas/agents.d"),
    )


def test_opmasd_list_agents_prints_each_package_and_fails_on_a_broken_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opmasd.__main__ import list_agents

    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "agent.yaml").write_text("name: good\nentrypoint: [sleep, '60']\n")
    assert list_agents((tmp_path,)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"agents directories: {tmp_path}", f"good\t{tmp_path / 'good'}"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "agent.yaml").write_text("name: [\n")
    assert list_agents((tmp_path,)) == 1
    captured = capsys.readouterr()
    # (Unconfigured here, structlog's warning goes to stdout; opmasd sets it on stderr first.)
    assert [line for line in captured.out.splitlines() if "\t" in line] == [f"good\t{tmp_path / 'good'}"]
    assert f"opmasd: {tmp_path / 'broken' / 'agent.yaml'}: line 2: invalid YAML" in captured.err
