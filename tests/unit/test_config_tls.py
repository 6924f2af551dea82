"""The tls section of opmasd's configuration: what is refused at load, and how it is said.

Every refusal names the key (tls.cert, OPMAS_TLS_KEY, ...) and the file, and never shows what
is in a file. A non-loopback address needs TLS, or the unsafe key that accepts plaintext.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import trustme

from opmasd.config import ConfigError, load_config
from opmasd.config import loading as config_loading

USER_ENV = {"HOME": "/home/op", "XDG_STATE_HOME": "/home/op/.state", "XDG_RUNTIME_DIR": "/run/user/1000"}


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_loading, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "opmasd.yaml")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """cert.pem, key.pem (0600), ca.pem, other.key (a key of another certificate) and cert.key
    (a certificate where a key should be, 0600)."""
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    for name, data in (("key.pem", issued.private_key_pem.bytes()), ("other.key", b"")):
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o600)
    (tmp_path / "other.key").write_bytes(ca.issue_cert("other").private_key_pem.bytes())
    (tmp_path / "cert.key").write_bytes((tmp_path / "cert.pem").read_bytes())
    (tmp_path / "cert.key").chmod(0o600)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "opmasd.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refusal(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_config(path, {**USER_ENV, **(env or {})}, euid=1000)
    return raised.value


def secrets_of(folder: Path) -> list[str]:
    """Lines of the PEM bodies in the folder: none may appear in a message."""
    return [
        line
        for path in folder.glob("*.*")
        if path.suffix in (".pem", ".key")
        for line in path.read_text(errors="replace").splitlines()
        if line and not line.startswith("-----")
    ]


def test_tls_is_read_with_paths_relative_to_the_file(pki: Path) -> None:
    config = load_config(
        write(pki, "tls: {cert: cert.pem, key: key.pem, client_ca: ca.pem}\n"), USER_ENV, euid=1000
    )
    assert (config.tls.cert, config.tls.key, config.tls.client_ca) == (
        pki / "cert.pem",
        pki / "key.pem",
        pki / "ca.pem",
    )
    assert config.tls.files is not None and config.tls.files.client_ca is not None
    assert "PRIVATE" not in repr(config)


def test_tls_from_the_environment(pki: Path) -> None:
    env = {"OPMAS_TLS_CERT": str(pki / "cert.pem"), "OPMAS_TLS_KEY": str(pki / "key.pem")}
    config = load_config(None, {**USER_ENV, **env}, euid=1000)
    assert config.tls.files is not None and config.tls.client_ca is None


def test_no_tls_by_default() -> None:
    config = load_config(None, USER_ENV, euid=1000)
    assert config.tls.cert is None and config.tls.files is None


@pytest.mark.parametrize(
    ("text", "env", "named", "says"),
    [
        ("tls: {cert: cert.pem}", {}, "tls.cert", "given without tls.key"),
        ("tls: {key: key.pem}", {}, "tls.key", "given without tls.cert"),
        ("tls: {client_ca: ca.pem}", {}, "tls.client_ca", "needs TLS: set tls.cert and tls.key"),
        ("", {"OPMAS_TLS_CLIENT_CA": "ca.pem"}, "OPMAS_TLS_CLIENT_CA", "needs TLS"),
        ("tls: {cert: missing.pem, key: key.pem}", {}, "tls.cert", "missing.pem: no such file"),
        ("tls: {cert: cert.pem, key: missing.key}", {}, "tls.key", "missing.key: no such file"),
        ("tls: {cert: cert.pem, key: other.key}", {}, "tls.key", "does not match the certificate in"),
        ("tls: {cert: key.pem, key: key.pem}", {}, "tls.cert", "holds no certificate"),
        ("tls: {cert: cert.pem, key: cert.key}", {}, "tls.key", "no private key could be read"),
        (
            "tls: {cert: cert.pem, key: key.pem, client_ca: key.pem}",
            {},
            "tls.client_ca",
            "holds no certificate",
        ),
        ("tls: {cert: cert.pem, key: key.pem, client_ca: .}", {}, "tls.client_ca", "not a regular file"),
        ("tls: {cert: opmasd.yaml, key: key.pem}", {}, "tls.cert", "not PEM"),
        (
            "tls: {cert: cert.pem, key: key.pem}\ngrpc: {address: ''}\nrest: {enabled: false}",
            {},
            "tls.cert",
            "no TCP listener to serve TLS on",
        ),
    ],
)
def test_refused_naming_the_key_and_the_file_never_the_content(
    pki: Path, text: str, env: dict[str, str], named: str, says: str
) -> None:
    err = refusal(write(pki, text + "\n"), {k: str(pki / v) for k, v in env.items()})
    assert err.key == named, err
    assert says in str(err), err
    assert not [line for line in secrets_of(pki) if line in str(err)], err


def test_a_key_every_user_may_read_is_refused_group_is_allowed(pki: Path) -> None:
    path = write(pki, "tls: {cert: cert.pem, key: key.pem}\n")
    (pki / "key.pem").chmod(0o604)
    err = refusal(path)
    assert err.key == "tls.key" and str(pki / "key.pem") in str(err), err
    assert "readable by every user (mode 0604)" in str(err) and "chmod o-r" in str(err), err
    (pki / "key.pem").chmod(0o640)  # Debian's ssl-cert group
    assert load_config(path, USER_ENV, euid=1000).tls.files is not None


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(pki: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((pki / "key.pem").read_bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (pki / "key.pem").write_bytes(encrypted)
    err = refusal(write(pki, "tls: {cert: cert.pem, key: key.pem}\n"))
    assert err.key == "tls.key" and "encrypted with a passphrase" in str(err), err


def test_a_fifo_in_place_of_a_file_is_refused_not_read(pki: Path) -> None:
    os.mkfifo(pki / "fifo.pem")
    err = refusal(write(pki, "tls: {cert: fifo.pem, key: key.pem}\n"))
    assert err.key == "tls.cert" and "not a regular file" in str(err), err


def test_a_huge_file_is_refused(pki: Path) -> None:
    (pki / "big.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (2 << 20))
    err = refusal(write(pki, "tls: {cert: big.pem, key: key.pem}\n"))
    assert err.key == "tls.cert" and "larger than 1 MiB" in str(err), err


@pytest.mark.parametrize("section", ["grpc", "rest"])
def test_a_remote_address_needs_tls_or_the_unsafe_key(pki: Path, section: str) -> None:
    listen = f"{section}: {{address: '0.0.0.0:8443'}}\n"
    err = refusal(write(pki, listen))
    assert err.key == f"{section}.address", err
    assert "TLS is not configured" in str(err) and "configure tls.cert and tls.key" in str(err), err
    assert "auth.unsafe_allow_plaintext_remote" in str(err) and "not available yet" not in str(err), err
    with_tls = load_config(write(pki, listen + "tls: {cert: cert.pem, key: key.pem}\n"), USER_ENV, euid=1000)
    assert with_tls.tls.files is not None
