"""Agent environments for the systemd runtime: one EnvironmentFile per unit, readable by opmasd alone.

A unit's `Environment=` is public: every local user reads it with `systemctl show -p
Environment`, and systemd writes it into /run/systemd/transient/<unit> (mode 0644). An agent's
environment holds its NATS credentials, so the unit names a file instead (`EnvironmentFiles`):
mode 0600 in a directory of mode 0700, both opmasd's, under its runtime directory. systemd (as
root, or as opmasd's own user for a user manager) reads it when it executes the unit. The file
is written before StartTransientUnit and removed once the unit is gone; at connect, files of
units no longer loaded are swept.

The encoding is what systemd 252's EnvironmentFile parser reads back byte for byte (checked
against it: tests/integration/test_systemd_secrets.py): `KEY="value"`, with `\\` and `"`
escaped by a backslash. Inside double quotes that parser keeps everything else as it is: `$`
(no expansion), `'`, backquotes, leading and trailing spaces, `#`, tabs, control characters
and newlines. Names are the manager's grammar ([A-Za-z_][A-Za-z0-9_]*), checked again here.

File names are a hash of the unit name (unit names hold backslashes and may be 255 bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SUFFIX = ".env"


def encode_environment(environment: Mapping[str, str]) -> bytes:
    """The EnvironmentFile text of environment. ValueError naming a key that cannot be carried
    (a name off the grammar, a NUL in its value)."""
    lines = []
    for key, value in environment.items():
        if not _NAME.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} cannot be passed to systemd")
        if "\0" in value:
            raise ValueError(f"the value of environment variable {key} holds a NUL character")
        quoted = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{quoted}"\n')
    return "".join(lines).encode("utf-8", "surrogateescape")


def file_name(unit: str) -> str:
    return hashlib.sha256(unit.encode("utf-8")).hexdigest()[:40] + SUFFIX


class EnvironmentFiles:
    """The directory of the units' environment files.

    directory: as the units' systemd sees it (what goes into EnvironmentFiles); root: where
    that systemd's filesystem is seen from here ("/", or /proc/PID/root for one in namespaces
    of its own)."""

    def __init__(self, directory: Path, root: Path = Path("/")) -> None:
        self.directory = directory
        self._here = root / str(directory).lstrip("/")

    def path(self, unit: str) -> str:
        """The unit's file, as its systemd sees it."""
        return str(self.directory / file_name(unit))

    async def write(self, unit: str, environment: Mapping[str, str]) -> str:
        """Write the unit's file (0600, replacing an older one); its path as systemd sees it.
        ValueError for an environment that cannot be carried, OSError when it cannot be written."""
        data = encode_environment(environment)
        # Off the loop: up to the manager's bound on an environment (512 values of 32 KiB).
        await asyncio.to_thread(self._write, file_name(unit), data)
        return self.path(unit)

    def _write(self, name: str, data: bytes) -> None:
        self._prepare()
        final = self._here / name
        temporary = self._here / f".{name}.{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, and a file left by an older run
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, final)

    def _prepare(self) -> None:
        """The directory, 0700 and ours; refused when it is someone else's or a link."""
        self._here.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(self._here)
        if not os.path.isdir(self._here) or os.path.islink(self._here) or info.st_uid != os.geteuid():
            raise OSError(f"{self.directory} is not a directory of opmasd's own")
        if info.st_mode & 0o077:
            os.chmod(self._here, 0o700)

    def remove(self, unit: str) -> None:
        """Remove the unit's file (a few unlink calls: fine on the loop)."""
        try:
            (self._here / file_name(unit)).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove a unit's environment file", unit=unit, error=str(exc))

    def sweep(self, loaded_units: Iterable[str]) -> list[str]:
        """Remove the files of units that are not loaded any more; the names removed."""
        keep = {file_name(unit) for unit in loaded_units}
        removed: list[str] = []
        try:
            names = [entry.name for entry in os.scandir(self._here)]
        except FileNotFoundError:
            return removed
        except OSError as exc:
            log.error("cannot list the units' environment files", directory=str(self.directory),
                      error=str(exc))  # fmt: skip
            return removed
        for name in names:
            if name in keep or not (name.endswith(SUFFIX) or name.startswith(".")):
                continue
            try:
                (self._here / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove a stale environment file", file=name, error=str(exc))
        if removed:
            log.info("removed environment files of units no longer loaded", count=len(removed))
        return removed
