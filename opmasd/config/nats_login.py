"""Checks of how opmasd logs in to an external NATS server (the `nats` section's login keys).

A login key is either used or refused: the embedded server (nats.url empty) makes its own
login, so a user, token, seed or certificate given for it would be ignored — refused instead.
At most one way of logging in; TLS files only for tls:// (or wss://) servers, which alone
use them; every file exists, is private where it holds a secret, and holds what it should.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from opmas.tlsfiles import TlsFileError, check_ca, load_cert_chain, read_bounded, read_pem
from opmasd.bus.login import NatsLogin
from opmasd.config.schema import NatsConfig

# The keys that say how to log in; one way at most (user goes with password).
LOGIN_KEYS = ("password", "token", "creds_file", "nkey_seed_file")
TLS_KEYS = ("tls_ca", "tls_cert", "tls_key")

Refuse = Callable[[str, str], NoReturn]


def check_nats_login(nats: dict[str, Any], refuse: Refuse) -> None:
    """Refuse (refuse(key, why)) a login setting that would be ignored or cannot work."""
    given = [key for key in ("user", *LOGIN_KEYS, *TLS_KEYS) if nats.get(key)]
    if nats.get("tls_verify") is False:
        given.append("tls_verify")
    url = nats.get("url", "")
    if not url:
        if given:
            refuse(
                given[0],
                "configures the login to an external NATS server (nats.url), and nats.url is empty: "
                "the embedded server makes its own login; remove it, or set nats.url",
            )
        return
    ways = [key for key in LOGIN_KEYS if nats.get(key)]
    if any("@" in server.partition("://")[2].partition("/")[0] for server in url.split(",")):
        ways.insert(0, "url")  # nats://user:password@host: a login of its own
    if len(ways) > 1:
        refuse(ways[1], f"give one way to log in to NATS, not nats.{ways[0]} and nats.{ways[1]}")
    if nats.get("user") and not nats.get("password"):
        refuse("user", "needs nats.password")
    if nats.get("password") and not nats.get("user"):
        refuse("password", "needs nats.user")
    if any(nats.get(key) for key in TLS_KEYS) or nats.get("tls_verify") is False:
        servers = [server.strip() for server in url.split(",")]
        plain = [server for server in servers if not server.startswith(("tls://", "wss://"))]
        if plain:
            key = next((key for key in TLS_KEYS if nats.get(key)), "tls_verify")
            refuse(key, f"applies to tls:// servers only, and {plain[0].split('@')[-1]!r} is not one")
    if bool(nats.get("tls_cert")) != bool(nats.get("tls_key")):
        refuse("tls_cert" if nats.get("tls_key") else "tls_key", "nats.tls_cert and nats.tls_key go together")
    if nats.get("tls_ca") and nats.get("tls_verify") is False:
        refuse("tls_verify", "is off, so nats.tls_ca would be ignored: keep one of them")
    _check_files(nats, refuse)


def _check_files(nats: dict[str, Any], refuse: Refuse) -> None:
    """Each file is read (bounded) and checked as opmas.tlsfiles reads TLS files; what is wrong
    is named, never what is in it."""
    checks: list[tuple[str, Callable[[Path], None]]] = [
        ("creds_file", _check_creds),
        ("nkey_seed_file", _check_seed),
        ("tls_ca", lambda path: check_ca("ca", read_pem("ca", path))),
    ]
    for key, check in checks:
        if nats.get(key):
            try:
                check(nats[key])
            except TlsFileError as exc:
                refuse(key, str(exc))
    if nats.get("tls_cert") and nats.get("tls_key"):
        cert, key = nats["tls_cert"], nats["tls_key"]
        try:
            load_cert_chain(
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), read_pem("cert", cert), read_pem("key", key)
            )
        except TlsFileError as exc:
            refuse("tls_cert" if exc.which == "cert" else "tls_key", str(exc))


def _check_seed(path: Path) -> None:
    """An NKey user seed: one line starting SU (what `nk -gen user` prints)."""
    seed = read_bounded("key", path).strip()
    if not (seed.startswith(b"SU") and len(seed) == 58 and seed.isalnum()):
        raise TlsFileError("key", path, "not an NKey user seed (one line of 58 characters starting SU)")


def _check_creds(path: Path) -> None:
    """A creds file: a user JWT and an NKey seed between the markers `nsc` writes."""
    text = read_bounded("key", path)
    for marker in (b"-----BEGIN NATS USER JWT-----", b"-----BEGIN USER NKEY SEED-----"):
        if marker not in text:
            section = marker.decode().strip("-")
            raise TlsFileError("key", path, f"not a NATS creds file (no {section} section)")


def nats_login(nats: NatsConfig) -> NatsLogin:
    """The bus's login to the external server the section names (checked at load)."""
    return NatsLogin(
        user=nats.user,
        password=nats.password,
        token=nats.token,
        creds_file=nats.creds_file,
        nkey_seed_file=nats.nkey_seed_file,
        tls_verify=nats.tls_verify,
        tls_ca=nats.tls_ca,
        tls_cert=nats.tls_cert,
        tls_key=nats.tls_key,
    )
