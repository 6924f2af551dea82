"""How the bus logs in to a NATS server and what it trusts there: NatsLogin.

One way of logging in (user and password, token, creds file or NKey seed; the configuration
refuses more than one) and, for tls:// servers, the CA to trust and a client certificate.
nats-py reads a creds file or seed itself at each (re)connect, so a rotated file is picked up
by the next connect without a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NatsLogin:
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    tls_verify: bool = True
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def connect_options(self) -> dict[str, Any]:
        """nats-py connect() keywords for the login (none set: an anonymous connection)."""
        options: dict[str, Any] = {}
        if self.user:
            options.update(user=self.user, password=self.password)
        if self.token:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = str(self.creds_file)
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = str(self.nkey_seed_file)
        return options

    def tls_context(self) -> ssl.SSLContext:
        """The context for tls:// servers: the system's CAs or tls_ca, and the client
        certificate if one is set; tls_verify=False accepts any certificate and name."""
        context = ssl.create_default_context(cafile=self.tls_ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.tls_cert is not None and self.tls_key is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context
