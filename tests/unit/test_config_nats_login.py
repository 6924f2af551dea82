"""The nats section's login keys: each is used for an external server, or refused at load.

Refused: a login for the embedded server (it would be ignored), two ways of logging in at once,
a user without a password, TLS files for servers that are not tls://, a certificate without
its key, a CA with verification off, a secret file every local user may read, a file that is
not what its key says. Messages name the key and the file, never the file's content.
"""

from __future__ import annotations

from pathlib import Path

import nkeys
import pytest
import trustme

from opmasd.config import Config, ConfigError, load_config
from opmasd.config.nats_login import nats_login

ENV = {"HOME": "/home/op"}
SEED = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER).decode()


def load(tmp_path: Path, nats: str) -> Config:
    path = tmp_path / "opmasd.yaml"
    path.write_text("nats:\n" + "".join(f"  {line}\n" for line in nats.strip().splitlines()))
    path.chmod(0o600)
    return load_config(path, ENV, euid=1000)


def refused(tmp_path: Path, nats: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, nats)
    return info.value


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("nats", "key", "reason"),
    [
        ("user: u\npassword: p", "nats.user", "the embedded server makes its own login"),
        ("token: t", "nats.token", "nats.url is empty"),
        ("url: nats://n:4222\nuser: u\npassword: p\ntoken: t", "nats.token", "one way to log in"),
        ("url: nats://n:4222\nuser: u", "nats.user", "needs nats.password"),
        ("url: nats://n:4222\npassword: p", "nats.password", "needs nats.user"),
        ("url: nats://n:4222\ntls_ca: ca.pem", "nats.tls_ca", "tls:// servers only"),
        ("tls_verify: false", "nats.tls_verify", "nats.url is empty"),
        ("url: nats://n:4222\ntls_verify: false", "nats.tls_verify", "tls:// servers only"),
        ("url: nats://u:p@n:4222\ntoken: t", "nats.token", "not nats.url and nats.token"),
        ("url: tls://n:4222\ntls_key: k.pem", "nats.tls_cert", "go together"),
        ("url: tls://n:4222\ntls_cert: c.pem\ntls_key: k.pem", "nats.tls_cert", "no such file"),
        ("url: tls://n:4222\nnkey_seed_file: /nonexistent/seed", "nats.nkey_seed_file", "no such file"),
    ],
)
def test_refused(tmp_path: Path, nats: str, key: str, reason: str) -> None:
    (tmp_path / "ca.pem").write_text("x")
    error = refused(tmp_path, nats)
    assert error.key == key
    assert reason in error.reason


def test_a_world_readable_seed_is_refused_without_echoing_it(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text(SEED)
    seed.chmod(0o644)
    error = refused(tmp_path, f"url: nats://n:4222\nnkey_seed_file: {seed}")
    assert error.key == "nats.nkey_seed_file"
    assert "readable by every user" in error.reason and "chmod o-r" in error.reason
    assert SEED not in str(error)


def test_a_file_that_is_not_a_seed_or_creds_file(tmp_path: Path) -> None:
    secret = private(tmp_path / "f", "SUPER-SECRET-NOT-A-SEED\n")
    error = refused(tmp_path, f"url: nats://n:4222\nnkey_seed_file: {secret}")
    assert "not an NKey user seed" in error.reason and "SUPER-SECRET" not in str(error)
    error = refused(tmp_path, f"url: nats://n:4222\ncreds_file: {secret}")
    assert "not a NATS creds file" in error.reason and "SUPER-SECRET" not in str(error)


def test_tls_files_are_checked(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("opmasd.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    other = trustme.CA().issue_cert("x.test")
    private(tmp_path / "k.pem", other.private_key_pem.bytes().decode())  # not c.pem's key
    error = refused(tmp_path, "url: tls://n:4222\ntls_cert: c.pem\ntls_key: k.pem")
    assert error.key == "nats.tls_key"
    assert "PRIVATE KEY" not in str(error)
    private(tmp_path / "not-ca.pem", "hello")
    assert "not PEM" in refused(tmp_path, "url: tls://n:4222\ntls_ca: not-ca.pem").reason
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    error = refused(tmp_path, "url: tls://n:4222\ntls_ca: ca.pem\ntls_verify: false")
    assert error.key == "nats.tls_verify"


def test_each_way_of_logging_in_is_accepted_and_reaches_the_bus(tmp_path: Path) -> None:
    seed = private(tmp_path / "user.nk", SEED + "\n")
    creds = private(
        tmp_path / "u.creds",
        "-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n"
        f"-----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n",
    )
    ca = trustme.CA()
    cert = ca.issue_cert("opmasd.test")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    private(tmp_path / "k.pem", cert.private_key_pem.bytes().decode())
    cases = {
        "url: nats://n:4222\ntoken: t0k": {"token": "t0k"},
        "url: nats://n:4222\nuser: u\npassword: p": {"user": "u", "password": "p"},
        f"url: nats://n:4222\nnkey_seed_file: {seed}": {"nkeys_seed": str(seed)},
        "url: nats://n:4222\ncreds_file: u.creds": {"user_credentials": str(creds)},
        "url: tls://n:4222\ntls_ca: ca.pem\ntls_cert: c.pem\ntls_key: k.pem": {},
    }
    for text, options in cases.items():
        config = load(tmp_path, text)
        login = nats_login(config.nats)
        assert login.connect_options() == options, text
        assert "t0k" not in repr(config) and "'p'" not in repr(login)
    login = nats_login(
        load(tmp_path, "url: tls://n:4222\ntls_ca: ca.pem\ntls_cert: c.pem\ntls_key: k.pem").nats
    )
    context = login.tls_context()
    assert any(
        c["subject"] == ((("organizationName", "trustme v1.2.1"),),) or c for c in context.get_ca_certs()
    )
    assert len(context.get_ca_certs()) == 1  # only the configured CA, not the system's


@pytest.mark.parametrize("key", ["password", "token"])
def test_a_bad_secret_value_is_not_echoed(tmp_path: Path, key: str) -> None:
    error = refused(tmp_path, f"url: nats://n:4222\nuser: u\n{key}: [TOPSECRET]")
    assert error.key == f"nats.{key}" and "TOPSECRET" not in str(error)
