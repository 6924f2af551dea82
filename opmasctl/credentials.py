"""Who opmasctl says it is: the bearer token it sends, and the per-user file that may hold it.

A daemon asks remote callers (TCP gRPC, REST) for an API token; its local unix socket asks for
none. The token is `--token`, else $OPMAS_TOKEN, else `token:` in the user's file
`$XDG_CONFIG_HOME/opmas/opmasctl.yaml` (default ~/.config/opmas/opmasctl.yaml), whose other key,
`server:`, names the daemon after --server and $OPMAS_SERVER, and whose `ca:`, `cert:` and `key:`
give the TLS files after --ca/--cert/--key and $OPMAS_CA/$OPMAS_CERT/$OPMAS_KEY (paths relative
to the file's folder; opmasctl.tls reads them). The file is read only when one of its settings
is still wanted (the TLS ones only for a server that may be dialled over TLS), and refused
(never used in part) when it is not the user's own, when others may write it (its `server:`
decides where a token goes, its `ca:` whom opmasctl trusts), when others may read the token in
it, or when it has a key opmasctl does not know. No message here ever shows a token.

The token goes only to a server named by --server, $OPMAS_SERVER or that `server:`, and only over
TCP (connection.withheld): never to a place opmasctl found by searching (whoever listens on
127.0.0.1:50051 while the daemon is away would get it), nor to a unix socket.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opmasctl.endpoints import parse_server

ENV_TOKEN = "OPMAS_TOKEN"
# The TLS settings: each one's flag is --<name>, its variable this, its key in the file <name>.
TLS_ENV = {"ca": "OPMAS_CA", "cert": "OPMAS_CERT", "key": "OPMAS_KEY"}
# Shown in --help and hints when the real path is not at hand.
DEFAULT_DISPLAY = "~/.config/opmas/opmasctl.yaml"
KEYS = ("server", "token", "ca", "cert", "key")
# Two short settings; anything near this is not the file.
MAX_USER_CONFIG_BYTES = 64 * 1024
# What a token is made of: printable ASCII without spaces (it travels in a metadata value).
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")
# Quoted text in a YAML parser's message may be a piece of the file (a tag, an alias).
_QUOTED = re.compile(r"'[^'\n]{3,}'")


# Why a known token was not sent: the daemon was found by searching, not named ("unnamed"), or it
# is reached over a unix socket ("unix").
Withheld = Literal["unnamed", "unix"]


class CredentialError(Exception):
    """The token or the user's file cannot be used; a usage error (exit status 2)."""


@dataclass(frozen=True)
class Token:
    """A bearer token and where it came from ("--token", "$OPMAS_TOKEN", "token: in FILE");
    the secret is left out of repr, so that no debug print shows it."""

    secret: str = field(repr=False)
    source: str

    def metadata(self) -> tuple[str, str]:
        """The gRPC metadata that presents it."""
        return ("authorization", f"Bearer {self.secret}")


@dataclass(frozen=True)
class UserConfig:
    """The user's file as read: absent keys (or an absent file) are None."""

    path: Path
    server: str | None = None
    token: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Setting:
    """A TLS file and where it was named ("--ca", "$OPMAS_CA", "`ca:` in FILE")."""

    path: Path
    source: str


@dataclass(frozen=True)
class ClientTls:
    """The CA opmasctl trusts (None: the system's) and the client certificate and key it
    presents (mTLS). Given a CA or a certificate, a TCP server is dialled over TLS."""

    ca: Setting | None = None
    cert: Setting | None = None
    key: Setting | None = None

    @property
    def given(self) -> bool:
        return self.ca is not None or self.cert is not None


@dataclass(frozen=True)
class Credentials:
    """What the flags, the environment and the user's file give for one invocation."""

    token: Token | None
    # The file's `server:` and its origin, when neither --server nor $OPMAS_SERVER is given.
    server: tuple[str, str] | None
    path: Path
    tls: ClientTls = ClientTls()


def user_config_path(env: Mapping[str, str] | None = None) -> Path:
    """$XDG_CONFIG_HOME/opmas/opmasctl.yaml; a relative $XDG_CONFIG_HOME is ignored, as the XDG
    base directory spec says, for ~/.config."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        base = Path(xdg)
    else:
        base = Path(env.get("HOME") or os.path.expanduser("~")) / ".config"
    return base / "opmas" / "opmasctl.yaml"


def check_token(secret: str, source: str) -> Token:
    """A token as given; CredentialError names the source, never the value."""
    secret = secret.strip()
    if not secret:
        raise CredentialError(f"{source}: the token is empty")
    if not _TOKEN_CHARS.match(secret):
        raise CredentialError(
            f"{source}: that is not a token: it has spaces, control or non-ASCII characters"
        )
    return Token(secret, source)


def resolve(
    flag_token: str | None,
    flag_server: str | None,
    env: Mapping[str, str] | None = None,
    euid: int | None = None,
    tls_flags: Mapping[str, str | None] | None = None,
) -> Credentials:
    """The token to send, the file's server and the TLS files, by precedence (tls_flags: --ca,
    --cert and --key by name); the file is read only when the flags and the environment leave
    one of them open."""
    env = os.environ if env is None else env
    path = user_config_path(env)
    want_token = flag_token is None and not env.get(ENV_TOKEN)
    want_server = not flag_server and not env.get("OPMAS_SERVER")
    given: dict[str, Setting] = {}
    for name, variable in TLS_ENV.items():
        flag = (tls_flags or {}).get(name)
        if flag:
            given[name] = Setting(Path(flag).expanduser(), f"--{name}")
        elif env.get(variable):
            given[name] = Setting(Path(env[variable]).expanduser(), f"${variable}")
    want_tls = len(given) < len(TLS_ENV) and _tls_possible(flag_server or env.get("OPMAS_SERVER"))
    token: Token | None = None
    if flag_token is not None:
        token = check_token(flag_token, "--token")
    elif env.get(ENV_TOKEN):
        token = check_token(env[ENV_TOKEN], f"${ENV_TOKEN}")
    wanted = want_token or want_server or want_tls
    config = read_user_config(path, euid) if wanted else UserConfig(path)
    if want_token and config.token is not None:
        token = Token(config.token, f"`token:` in {path}")
    server = (config.server, f"`server:` in {path}") if want_server and config.server else None
    for name in TLS_ENV:
        value = getattr(config, name)
        if name not in given and value:
            # Relative to the file's folder, as the daemon reads its own configuration.
            given[name] = Setting(path.parent / Path(value).expanduser(), f"`{name}:` in {path}")
    return Credentials(token, server, path, _client_tls(given))


def _tls_possible(server: str | None) -> bool:
    """Whether a server named by --server or $OPMAS_SERVER may be dialled over TLS: not a unix
    socket, not http:// (a server not named yet may be)."""
    if not server:
        return True
    try:
        endpoint = parse_server(server)
    except ValueError:
        return True  # reported as the address's own error
    return not endpoint.is_unix and not endpoint.plain


def _client_tls(given: Mapping[str, Setting]) -> ClientTls:
    """The TLS settings; CredentialError for a certificate without its key or the reverse."""
    cert, key = given.get("cert"), given.get("key")
    if cert is not None and key is None:
        raise CredentialError(f"{cert.source}: a client certificate needs its key: give --key too")
    if key is not None and cert is None:
        raise CredentialError(f"{key.source}: a client key needs its certificate: give --cert too")
    return ClientTls(given.get("ca"), cert, key)


def denied_hint(code: str, token: Token | None, path: Path | str, withheld: Withheld | None = None) -> str:
    """The line after an UNAUTHENTICATED or PERMISSION_DENIED answer (`code`: the status's name):
    how to present a token, which token was not good enough, or why the token known was not
    sent (`withheld`)."""
    if token is not None and withheld is not None:
        if withheld == "unix":
            why = "not sent: a token goes only over TCP, never to a unix socket"
        else:
            why = (
                "not sent, as no server was named: a token goes only to a daemon named by "
                f"--server host:port, $OPMAS_SERVER or `server:` in {path}"
            )
        if code == "PERMISSION_DENIED":
            return f"the caller's role does not allow this (the token from {token.source} was {why})"
        return f"this daemon needs a token over TCP; the token from {token.source} was {why}"
    if code == "PERMISSION_DENIED":
        if token is None:
            return (
                "the caller's role does not allow this: give a token whose role does (--token, "
                f"${ENV_TOKEN} or `token:` in {path})"
            )
        return f"the token's role does not allow this (the token from {token.source})"
    if token is None:
        return (
            f"this daemon needs a token over TCP: give --token, ${ENV_TOKEN} or `token:` in {path}; "
            "`opmasctl tokens create` on the daemon's host makes one"
        )
    return (
        f"the daemon did not accept the token from {token.source} (mistyped, expired or revoked?); "
        "`opmasctl tokens create` on the daemon's host makes a new one"
    )


def read_user_config(path: Path, euid: int | None = None) -> UserConfig:
    """The file's settings; an empty UserConfig when there is none. CredentialError: it exists
    and must not be used (not this user's, open to others, not YAML, an unknown key, ...)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang opmasctl; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return UserConfig(path)
    except OSError as err:
        raise CredentialError(f"{path}: cannot read it: {(err.strerror or str(err)).lower()}") from None
    # Checked before fdopen, which refuses a directory with an error of its own.
    info = os.fstat(fd)
    euid = os.geteuid() if euid is None else euid
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = f"{path}: not a regular file"
    elif info.st_uid != euid:
        problem = (
            f"{path} is owned by uid {info.st_uid}, not by you (uid {euid}): opmasctl takes "
            "a server and a token only from a file of your own"
        )
    if problem is not None:
        os.close(fd)
        raise CredentialError(problem)
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_USER_CONFIG_BYTES + 1)
    if len(data) > MAX_USER_CONFIG_BYTES:
        raise CredentialError(
            f"{path}: larger than {MAX_USER_CONFIG_BYTES // 1024} KiB: not opmasctl's settings"
        )
    config = _parse(path, data)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        # Whoever may write it may point `server:` elsewhere, and a token (from anywhere) with it.
        _refuse(path, mode, "lets other users change it, and so where your token is sent")
    if config.token is not None and mode & 0o044:
        _refuse(path, mode, "lets other users read the token in it")
    return config


def _refuse(path: Path, mode: int, why: str) -> None:
    raise CredentialError(
        f"{path} has mode {mode:04o}, which {why}; run `chmod 600 {shlex.quote(str(path))}`"
    )


def _parse(path: Path, data: bytes) -> UserConfig:
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        # Only where and what: the parser's context lines would quote the file, token and all.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = _QUOTED.sub("'…'", str(getattr(err, "problem", None) or "cannot parse it"))
        raise CredentialError(f"{path}: invalid YAML{where}: {problem}") from None
    if document is None:
        return UserConfig(path)
    if not isinstance(document, dict):
        raise CredentialError(f"{path}: not a mapping of keys (server: ADDR, token: TOKEN)")
    for key in document:
        if key not in KEYS:
            raise CredentialError(
                f"{path}: unknown key {_key_text(key)}; the keys are server, token, ca, cert and key"
            )
    server = _string(document, "server", path)
    token = _string(document, "token", path)
    if token is not None:
        token = check_token(token, f"`token:` in {path}").secret
    ca, cert, key = (_string(document, name, path) for name in TLS_ENV)
    return UserConfig(path, server, token, ca, cert, key)


def _key_text(key: object) -> str:
    text = str(key)
    # `opmas_<id>_<secret>:` is a token written as a key: never echo it.
    if text.startswith("opmas_") or len(text) > 64:
        return "(not shown: it looks like a token; write `token: <it>`)"
    return repr(key)


def _string(document: dict[Any, Any], key: str, path: Path) -> str | None:
    value = document.get(key)
    if value is None:
        return None  # written without a value: as if absent
    if not isinstance(value, str):
        raise CredentialError(f"{path}: {key}: must be a string")
    return value.strip() or None
