"""Certificate, private key and CA files, as opmasd and opmasctl read them for TLS.

One rule for both sides: a file is read once, bounded (MAX_PEM_BYTES), from a regular file only
(a FIFO or a device in its place is refused, never read); a private key that every user may read
is refused (group-readable is allowed: Debian's `ssl-cert` group); the key must match the
certificate and the CA file must hold a certificate. What was read is then what is used: the
bytes go to grpc as they are, and to `ssl` through a memfd, so that nothing is read twice (a
file replaced in between) and OpenSSL never reads a file of unbounded size itself.

Errors (TlsFileError) name the file and say what is wrong with it, never what is in it.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MAX_PEM_BYTES",
    "CertSummary",
    "PemFile",
    "ServerFiles",
    "TlsFileError",
    "Which",
    "check_ca",
    "describe",
    "load_ca",
    "load_cert_chain",
    "read_bounded",
    "read_pem",
    "read_server_files",
]

# A certificate chain is a few KiB; a CA bundle (the system's) a few hundred.
MAX_PEM_BYTES = 1 << 20
# Which setting a file is given by: the certificate, its private key, or the CA that checks peers.
Which = Literal["cert", "key", "ca"]


class TlsFileError(ValueError):
    """A TLS file that cannot be used: `which` setting gave it, `path` is where, `reason` why."""

    def __init__(self, which: Which, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.which = which
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class PemFile:
    """A file's bytes as read once (never shown: they may be a private key)."""

    path: Path
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class CertSummary:
    """What a log line may tell of a certificate: its subject and when it expires."""

    subject: str
    not_after: datetime | None

    def expired(self, now: datetime | None = None) -> bool:
        return self.not_after is not None and self.not_after <= (now or datetime.now(UTC))


@dataclass(frozen=True)
class ServerFiles:
    """A server's certificate chain, its key and (for mTLS) the CA its clients' certificates
    must come from, read and checked (read_server_files)."""

    cert: PemFile
    key: PemFile
    client_ca: PemFile | None = None


def read_server_files(cert: Path, key: Path, client_ca: Path | None = None) -> ServerFiles:
    """Read and check a server's files (blocking: small files, but files; keep it off an event
    loop). TlsFileError names the one at fault."""
    files = ServerFiles(
        read_pem("cert", cert), read_pem("key", key), read_pem("ca", client_ca) if client_ca else None
    )
    load_cert_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files.cert, files.key)
    if files.client_ca is not None:
        check_ca("ca", files.client_ca)
    return files


def read_pem(which: Which, path: Path) -> PemFile:
    """The file's bytes; TlsFileError when it is missing, unreadable, not a regular file, too
    large, not PEM, or (which="key") readable by every user."""
    data = read_bounded(which, path)
    if b"-----BEGIN " not in data:
        wanted = "a PEM private key" if which == "key" else "PEM certificates"
        raise TlsFileError(which, path, f"not PEM: {wanted} (-----BEGIN ...) expected")
    return PemFile(path, data)


def read_bounded(which: Which, path: Path) -> bytes:
    """read_pem without the PEM check, for the other small secrets a configuration names (an
    NKey seed: which="key" refuses it readable by every user)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the reader; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TlsFileError(which, path, "no such file") from None
    except OSError as err:
        raise TlsFileError(which, path, f"cannot read it: {(err.strerror or str(err)).lower()}") from None
    # Checked before fdopen, which refuses a directory with an error of its own.
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "not a regular file"
    elif which == "key" and mode & stat.S_IROTH:
        problem = (
            f"a private key readable by every user (mode {mode:04o}): "
            f"run `chmod o-r {path}` (0600, or 0640 for a group such as ssl-cert)"
        )
    if problem is not None:
        os.close(fd)
        raise TlsFileError(which, path, problem)
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_PEM_BYTES + 1)
        except OSError as err:
            raise TlsFileError(which, path, f"cannot read it: {(err.strerror or str(err)).lower()}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(which, path, f"larger than {MAX_PEM_BYTES >> 20} MiB: not a key or certificate")
    return data


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that only this process can open (a memfd, through /proc/self/fd)."""
    fd = os.memfd_create("opmas-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    # Called by OpenSSL only for an encrypted key: nobody is there to type a passphrase.
    raise _Encrypted


def check_ca(which: Which, pem: PemFile) -> None:
    """TlsFileError unless the file holds at least one certificate."""
    load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), pem, which)


def load_ca(context: ssl.SSLContext, pem: PemFile, which: Which = "ca") -> None:
    """The file's certificates as the context's trusted CAs."""
    try:
        context.load_verify_locations(cadata=pem.data.decode("ascii"))
    except UnicodeDecodeError:
        raise TlsFileError(which, pem.path, "not PEM text (it has non-ASCII bytes)") from None
    except ssl.SSLError:
        raise TlsFileError(which, pem.path, "holds no certificate that can be read") from None


def load_cert_chain(context: ssl.SSLContext, cert: PemFile, key: PemFile) -> None:
    """The certificate chain and its key into the context; TlsFileError names the file at fault
    (a key that does not match is the key's fault, an encrypted one too)."""
    check_ca("cert", cert)  # it holds a certificate at all
    try:
        with _memory_file(cert.data) as cert_path, _memory_file(key.data) as key_path:
            context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except _Encrypted:
        raise TlsFileError(
            "key",
            key.path,
            "the key is encrypted with a passphrase; give it unencrypted "
            "(`openssl pkey -in KEY -out KEY.plain`), protected by its file mode",
        ) from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            reason = f"the key does not match the certificate in {cert.path}"
        else:
            reason = "no private key could be read from it (a PEM PRIVATE KEY expected)"
        raise TlsFileError("key", key.path, reason) from None
    except OSError as err:  # the memfd (out of file descriptors, ...)
        raise TlsFileError("cert", cert.path, f"cannot load it: {err.strerror or err}") from None


def describe(cert: PemFile) -> CertSummary:
    """The first certificate's subject and expiry, for the log ("" and None when unreadable)."""
    try:
        with _memory_file(cert.data) as path:
            # The ssl module's own decoder (no public equivalent without `cryptography`).
            decoded: dict[str, Any] = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ssl.SSLError):
        return CertSummary("", None)
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}
    subject = ", ".join(
        f"{names.get(key, key)}={value}" for rdn in decoded.get("subject", ()) for key, value in rdn
    )
    not_after: datetime | None = None
    with contextlib.suppress(KeyError, ValueError):
        not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), UTC)
    return CertSummary(subject, not_after)
