"""TLS of the TCP listeners, gRPC and REST, and its replacement by a reload.

Both listeners serve the same files (opmas.tlsfiles.ServerFiles, read and checked by the
configuration's loader). A reload replaces them for the handshakes that follow, without a
restart and without touching connections already made:

- gRPC: the server's credentials are grpc's dynamic ones; grpc asks `_fetch` before each new
  handshake (on its own threads), which hands over the configuration a reload prepared, once,
  and None (no change) otherwise. It never reads a file.
- REST: aiohttp listens with one SSLContext whose SNI callback (OpenSSL runs it on every
  ClientHello, with or without a server name) moves the connection to the current context, so
  the certificate, its key and the CA store that checks client certificates are the new ones.

Whether client certificates are required (mTLS, tls.client_ca set or not) is fixed for the
listeners' life: grpc takes it when the port is added, and OpenSSL copies the verify mode into
each connection before the SNI callback runs. A reload that turns it on or off keeps the
running mode (and, when it was on, the running client CA) until a restart, and says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import threading
from dataclasses import dataclass

import grpc
import structlog

from opmas.tlsfiles import CertSummary, ServerFiles, TlsFileError, describe, load_ca, load_cert_chain

log = structlog.get_logger(__name__)

__all__ = ["PreparedTls", "ServerTls", "reload_tls", "server_context"]


def server_context(files: ServerFiles) -> ssl.SSLContext:
    """A server-side context of these files: TLS 1.2 at least, client certificates required
    and checked against the client CA when there is one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_chain(context, files.cert, files.key)
    if files.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        load_ca(context, files.client_ca)
    return context


def _grpc_configuration(files: ServerFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(files.key.data, files.cert.data)],
        root_certificates=files.client_ca.data if files.client_ca is not None else None,
    )


@dataclass(frozen=True)
class PreparedTls:
    """What a reload switches to, built off the event loop (ServerTls.prepare)."""

    files: ServerFiles
    rest: ssl.SSLContext
    grpc: grpc.ServerCertificateConfiguration
    summary: CertSummary
    # Why the client-certificate mode of the new files is not the one applied; None: it is.
    kept_mode: str | None


class ServerTls:
    """The TLS both TCP listeners serve; `replace` switches new handshakes to other files."""

    def __init__(self, files: ServerFiles) -> None:
        self.client_auth = files.client_ca is not None
        self._files = files
        self.summary = describe(files.cert)
        self._listening = server_context(files)
        self._listening.sni_callback = self._switch
        self._current = self._listening
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._initial = _grpc_configuration(files)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # None means "no change" (grpc's docs); typeshed omits it
            require_client_authentication=self.client_auth,
        )

    def rest_context(self) -> ssl.SSLContext:
        return self._listening

    def prepare(self, files: ServerFiles) -> PreparedTls:
        """The contexts of new files, in the running client-certificate mode (blocking: the
        keys are parsed; run it off the event loop)."""
        kept_mode = None
        if self.client_auth and files.client_ca is None:
            files = dataclasses.replace(files, client_ca=self._files.client_ca)
            kept_mode = (
                "tls.client_ca was removed: client certificates stay required, checked against "
                "the running client CA, until opmasd restarts"
            )
        elif not self.client_auth and files.client_ca is not None:
            files = dataclasses.replace(files, client_ca=None)
            kept_mode = "tls.client_ca was added: client certificates are not asked for until opmasd restarts"
        return PreparedTls(
            files, server_context(files), _grpc_configuration(files), describe(files.cert), kept_mode
        )

    def log_serving(self, event: str) -> None:
        """What the listeners serve, for the log: the certificate's subject and expiry, never
        its content; a warning when it has expired."""
        summary, files = self.summary, self._files
        expires = summary.not_after.isoformat() if summary.not_after else None
        fields = {"subject": summary.subject, "expires": expires, "cert": str(files.cert.path)}
        log.info(event, **fields, client_ca=str(files.client_ca.path) if files.client_ca else None)
        if summary.expired():
            log.warning("the TLS certificate has expired: clients will refuse it", **fields)

    async def reload(self, files: ServerFiles) -> None:
        """Switch to the files a reload read (the configuration's loader checked them); the
        running ones stay when they cannot be used."""
        try:
            prepared = await asyncio.to_thread(self.prepare, files)
        except TlsFileError as err:
            log.error("TLS certificates not reloaded; keeping the running ones", error=str(err))
            return
        if prepared.kept_mode is not None:
            log.warning("mTLS is turned on or off only at restart", reason=prepared.kept_mode)
        self.replace(prepared)
        self.log_serving("TLS certificates reloaded")

    def replace(self, prepared: PreparedTls) -> None:
        """New handshakes, gRPC's and REST's, use the prepared files from now on."""
        with self._lock:
            self._pending = prepared.grpc
        self._current = prepared.rest
        self._files = prepared.files
        self.summary = prepared.summary

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # On grpc's threads, before each handshake: no I/O, only what a reload prepared.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _switch(self, connection: ssl.SSLObject, server_name: str | None, listening: ssl.SSLContext) -> None:
        # Inside OpenSSL's handshake, on the event loop: the current files for this connection.
        connection.context = self._current


async def reload_tls(running: ServerTls | None, files: ServerFiles | None) -> bool:
    """A reload's TLS: the running listeners switch to the new files. False when TLS was turned
    on or off, which only a restart applies (the listeners are made at start)."""
    if running is None or files is None:
        return running is None and files is None
    await running.reload(files)
    return True
