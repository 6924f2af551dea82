"""The configuration file as read from disk: a regular file of bounded size, and not readable by
every user when it holds a secret.

A secret in a world-readable file is a secret every local user holds: the NATS password or token
it names is the daemon's own login, with every right on the bus. So such a file is refused at
start, with the mode to change it to; group-readable stays allowed (0640 root:opmas is how the
packages install it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

# Far more than any configuration needs; what is bigger is not a configuration file.
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigFileError(Exception):
    """The file cannot be used; the message names why (never what is in it)."""


def read_config_text(path: Path) -> tuple[str, int]:
    """The file's text and its permission bits. Refuses what is not a regular file (a FIFO
    would block the start forever) and what is bigger than MAX_CONFIG_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigFileError("no such file") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigFileError("not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigFileError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a configuration file")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a configuration file")
    try:
        return data.decode("utf-8"), stat.S_IMODE(info.st_mode)
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"not UTF-8 text (byte {exc.start})") from None


def secret_keys_in(sections: dict[str, dict[str, object]]) -> list[str]:
    """The keys of a parsed file that hold a secret: a password or token, or a URL with one."""
    found: list[str] = []
    for section, body in sections.items():
        for key, value in body.items():
            if key in ("password", "token") and value:
                found.append(f"{section}.{key}")
            elif key == "url" and isinstance(value, str) and _url_has_password(value):
                found.append(f"{section}.{key}")
    return found


def _url_has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False  # a malformed URL is reported by the key's own parser


def world_readable_secret(mode: int, secret_keys: list[str]) -> str | None:
    """Why the file may not be used, or None: a secret in a file every user can read."""
    if not secret_keys or not mode & stat.S_IROTH:
        return None
    return (
        f"holds a secret ({', '.join(secret_keys)}) and is readable by every user (mode "
        f"{mode:04o}): make it chmod 0640 (group opmas) or 0600"
    )
