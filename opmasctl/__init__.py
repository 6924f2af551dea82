"""opmasctl: the command-line client of opmasd, built on the opmas.v1 gRPC stubs only."""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("opmas")
    except metadata.PackageNotFoundError:
        # Running from a checkout that was never pip-installed.
        return "0.0.0+unknown"


__version__ = _version()
