"""Checks of the files a configuration names for secrets and certificates, at load.

A key file, an NKey seed or a NATS creds file that the daemon would only fail to read deep in
a connect loop (or, worse, read while every local user can too) is refused when the
configuration is loaded. The messages name the file and the reason, never what is in it.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

# Secrets and certificates are small; a larger file is not one (and is not read whole).
MAX_BYTES = 256 * 1024


class FileProblem(ValueError):
    """What is wrong with a named file, fit to follow "key: " in a ConfigError."""


def read_small(path: Path) -> bytes:
    """The file's bytes, if it is a readable regular file of at most MAX_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except OSError as exc:
        raise FileProblem(f"{path}: cannot open: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{path}: not a regular file")
        data = file.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise FileProblem(f"{path}: larger than {MAX_BYTES // 1024} KiB; not a key or certificate")
    return data


def read_secret(path: Path) -> bytes:
    """read_small, refusing a file every local user may read (group-readable is allowed: the
    ssl-cert group convention)."""
    data = read_small(path)
    mode = path.stat().st_mode
    if mode & stat.S_IROTH:
        raise FileProblem(
            f"{path}: readable by every local user (mode {stat.S_IMODE(mode):04o}); chmod o-rwx {path}"
        )
    return data


def check_cert_and_key(cert: Path, key: Path) -> None:
    """The certificate chain loads, the key is private and belongs to the certificate."""
    read_small(cert)
    read_secret(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or "not a PEM certificate and matching private key"
        raise FileProblem(f"{cert} with {key}: {reason.lower().replace('_', ' ')}") from None
    except OSError as exc:
        raise FileProblem(f"{cert} with {key}: {exc.strerror or exc}") from None


def check_ca(path: Path) -> None:
    """The file holds at least one PEM CA certificate."""
    data = read_small(path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise FileProblem(f"{path}: holds no PEM certificate") from None
