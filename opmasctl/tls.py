"""opmasctl over TLS: when it is used, the channel credentials from the files, and what a failed
handshake means, in one line.

TLS is used for a TCP server named `https://host:port`, for one whose daemon configuration gives
its address TLS (daemon_config), and for any TCP server (host:port) when a CA or a client
certificate is given (credentials.ClientTls: --ca/--cert/--key, $OPMAS_CA/$OPMAS_CERT/
$OPMAS_KEY, `ca:`/`cert:`/`key:` in the user's file). Never for a unix socket, nor for
`http://host:port`, which says plaintext. The server's certificate is checked against the CA
given, else against the system's CAs ($SSL_CERT_FILE names others), and must name the host
dialled.

The files are read when the channel is opened, as the daemon reads its own (opmas.tlsfiles:
bounded, regular files only, a key readable by every user refused, the key matching the
certificate); a problem is a usage error naming the setting and the file, never its content.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Mapping

import grpc

from opmas.tlsfiles import PemFile, TlsFileError, Which, check_ca, load_cert_chain, read_pem
from opmasctl.credentials import ClientTls, CredentialError, Setting
from opmasctl.endpoints import Endpoint, can_probe

__all__ = ["channel_credentials", "explain", "flags_refused", "uses_tls"]

# How long the check that a server speaks TLS waits for it (on the error path only).
PROBE_TIMEOUT = 2.0
_VERIFY_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)")


def uses_tls(endpoint: Endpoint, tls: ClientTls | None) -> bool:
    """Whether the channel to `endpoint` is TLS (see the module's docstring)."""
    if endpoint.is_unix or endpoint.plain:
        return False
    return endpoint.secure or (tls is not None and tls.given)


def flags_refused(flags: Mapping[str, str | None], named: Endpoint | None) -> str | None:
    """Why --ca/--cert/--key (by name, as given) make no sense for the server named (None: not
    named, found by searching): a unix socket, or http://."""
    given = " and ".join(f"--{name}" for name, value in flags.items() if value)
    if not given or named is None:
        return None
    if named.is_unix:
        return f"{given}: TLS is for a TCP server; {named.display} is a unix socket"
    if named.plain:
        return f"{given}: {named.display} says plaintext; use https:// (or host:port) for TLS"
    return None


def _read(setting: Setting, which: Which) -> PemFile:
    """The file of a setting, read and (a CA) checked; CredentialError names the setting."""
    try:
        pem = read_pem(which, setting.path)
        if which == "ca":
            check_ca(which, pem)
    except TlsFileError as err:
        raise CredentialError(f"{setting.source}: {err}") from None
    return pem


def channel_credentials(tls: ClientTls | None) -> grpc.ChannelCredentials:
    """TLS credentials: the CA given (else the system's), and the client certificate and key
    when given (checked to match). CredentialError names the setting at fault."""
    tls = tls or ClientTls()
    root = _read(tls.ca, "ca").data if tls.ca is not None else _system_roots()
    if tls.cert is None or tls.key is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert, key = _read(tls.cert, "cert"), _read(tls.key, "key")
    try:
        load_cert_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key)
    except TlsFileError as err:
        source = tls.key.source if err.which == "key" else tls.cert.source
        raise CredentialError(f"{source}: {err}") from None
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key.data, certificate_chain=cert.data
    )


def _system_roots() -> bytes | None:
    """The system's CA certificates (as ssl finds them, $SSL_CERT_FILE included); None lets
    grpc use the roots it ships."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as file:
                    return file.read()
            except OSError:
                continue
    return None


def explain(details: str, endpoint: Endpoint, tls: ClientTls | None) -> str | None:
    """Why a connection that failed at the transport failed, when TLS is the reason: a
    certificate not trusted or not naming the host, a plaintext server, a client certificate
    missing or refused, or (plaintext) a server that speaks TLS. None: not a TLS problem."""
    if endpoint.is_unix:
        return None
    ca = f"the CA from {tls.ca.source} ({tls.ca.path})" if tls is not None and tls.ca else None
    if uses_tls(endpoint, tls):
        if "Hostname Verification" in details or "Peer name" in details:
            host = endpoint.target.rpartition(":")[0]
            return f"its TLS certificate does not name {host}: dial it by a name the certificate has"
        verify = _VERIFY_FAILED.search(details)
        if verify is not None:
            why = verify.group(1).strip()
            if ca is not None:
                return f"its TLS certificate is not trusted by {ca}: {why}"
            return (
                f"its TLS certificate is not trusted: {why}; give the CA that signed it with --ca FILE "
                "($OPMAS_CA, or `ca:` in the user's file)"
            )
        if "ALPN" in details:
            # The TLS handshake went through, but the server did not agree to speak HTTP/2 (h2):
            # opmasd's REST port is the usual one (it speaks HTTP/1.1).
            return (
                "its TLS server does not speak gRPC (no h2 in the handshake): is it the REST port? "
                "opmasctl talks to grpc.address"
            )
        if "WRONG_VERSION_NUMBER" in details or "wrong version number" in details:
            return f"it does not speak TLS: use http://{endpoint.target}, or give no --ca/--cert"
        if _closed(details) and can_probe(endpoint):
            if tls is not None and tls.cert is not None:
                return (
                    "it closed the connection in the TLS handshake: it did not accept the client "
                    f"certificate from {tls.cert.source} (one its client CA did not sign?)"
                )
            return (
                "it closed the connection in the TLS handshake: it asks for a client certificate "
                "(mTLS): give --cert FILE and --key FILE"
            )
        return None
    if _closed(details) and can_probe(endpoint) and speaks_tls(endpoint):
        return (
            f"it speaks TLS: use https://{endpoint.target}, with --ca FILE when its certificate is "
            "not from a CA this system trusts"
        )
    return None


def _closed(details: str) -> bool:
    """Closed while connecting (not a call on a connection made, which the daemon's stop ends
    the same way)."""
    closed = any(words in details for words in ("Socket closed", "Connection reset", "connection reset"))
    return closed and "failed to connect" in details


def speaks_tls(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the server answers a TLS ClientHello as a TLS server (nothing is checked: this
    only names the problem)."""
    host, _, port = endpoint.target.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            context.wrap_socket(sock) as wrapped,
        ):
            wrapped.version()
    except ssl.SSLError as err:
        # A TLS alert (a client certificate required, ...) is a TLS server's answer too.
        return "ALERT" in (err.reason or "").upper()
    except (OSError, ValueError):
        return False
    return True
