"""opmasd: the OPMAS agent manager daemon."""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    # The installed distribution's version: pyproject.toml's (or a build's --version), one place.
    try:
        return metadata.version("opmas")
    except metadata.PackageNotFoundError:
        # Running from a checkout that was never pip-installed.
        return "0.0.0+unknown"


__version__ = _version()
