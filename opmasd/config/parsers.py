"""Value parsers for the configuration: one function per kind of value.

Every parser takes what YAML or the environment gave (environment values are always strings, so
every parser accepts the string form too) and returns the typed value, or raises ValueError whose
message is the reason only ("must be ...") — the loader adds the file and the key. Durations and
sizes are not here: they are opmas.units', shared with agent manifests and the client.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from opmasd.bus.subjects import is_valid_prefix

__all__ = [
    "parse_address",
    "parse_bool",
    "parse_choice",
    "parse_int",
    "parse_mode",
    "parse_nats_subject_prefix",
    "parse_node",
    "parse_optional_path",
    "parse_path",
    "parse_path_list",
    "parse_str",
    "parse_url",
    "split_address",
]


def _show(value: object) -> str:
    return repr(value)


def _reject(expectation: str, value: object) -> ValueError:
    return ValueError(f"must be {expectation}, got {_show(value)}")


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _reject("a boolean (true/false, yes/no, on/off, 1/0)", value)


def parse_str(value: object) -> str:
    # No silent str(123): a number where a string belongs is usually an unquoted YAML value
    # that lost something (leading zeros, trailing ".0"), so the operator should quote it.
    if isinstance(value, str):
        return value
    raise _reject("a string (quote it in YAML)", value)


def parse_int(minimum: int | None = None, maximum: int | None = None) -> Callable[[object], int]:
    if minimum is not None and maximum is not None:
        expectation = f"an integer between {minimum} and {maximum}"
    elif minimum is not None:
        expectation = f"an integer >= {minimum}"
    else:
        expectation = "an integer"

    def parse(value: object) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)
        if number is None or (minimum is not None and number < minimum):
            raise _reject(expectation, value)
        if maximum is not None and number > maximum:
            raise _reject(expectation, value)
        return number

    return parse


def parse_choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        # YAML 1.1 reads a bare `off` (and no, false) as False: what the operator wrote was "off".
        if value is False and "off" in choices:
            return "off"
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise _reject("one of " + ", ".join(choices), value)

    return parse


def parse_mode(value: object) -> int:
    """A file mode: a string is always octal ("0660", "660"); an int is the number itself."""
    mode: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip().lower()):
        mode = int(value.strip().lower().removeprefix("0o"), 8)
    # Set-id and sticky bits mean nothing on a socket; refusing them also catches the YAML trap
    # `socket_mode: 660` (decimal 660 is 0o1224).
    if mode is None or not 0 <= mode <= 0o777:
        raise _reject('an octal mode between 0000 and 0777 (quote it in YAML: "0660")', value)
    return mode


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; brackets are removed from the host."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f'must be "host:port", got {address!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'must put an IPv6 host in brackets ("[::1]:8000"), got {address!r}')
    port = int(port_text)
    if not host or port > 65535:
        raise ValueError(f"must be host:port with a port between 0 and 65535, got {address!r}")
    return host, port


def parse_address(value: object) -> str | None:
    """A listening address "host:port"; the empty string disables the listener (None)."""
    if not isinstance(value, str):  # e.g. a bare port number
        raise _reject('a "host:port" string', value)
    text = value.strip()
    if not text:
        return None
    split_address(text)
    return text


def parse_nats_subject_prefix(value: object) -> str:
    text = parse_str(value)
    if not is_valid_prefix(text):
        raise _reject(
            "NATS subject tokens (letters, digits, '-', '_') separated by dots, with no wildcards", value
        )
    return text


def parse_node(value: object) -> str:
    # A node name ends up in database rows and logs: hostname characters, dots included (the
    # default is the host name). A subject built from it must treat it as more than one token.
    text = parse_str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise _reject("a node name of letters, digits, '-', '_' and '.'", value)
    return text


def parse_path(value: object) -> Path:
    text = parse_str(value).strip()
    if not text:
        raise _reject("a non-empty path", value)
    return Path(text).expanduser()


def parse_path_list(value: object) -> tuple[Path, ...]:
    """A YAML list of paths, or one string of paths separated by ':' or ','."""
    if isinstance(value, str):
        items: list[object] = [item for item in re.split(r"[:,]", value) if item.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise _reject("a list of paths", value)
    paths = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _reject("a list of non-empty paths", value)
        paths.append(Path(item.strip()).expanduser())
    return tuple(paths)


def parse_optional_path(value: object) -> Path | None:
    return None if parse_str(value).strip() == "" else parse_path(value)


def parse_url(schemes: tuple[str, ...]) -> Callable[[object], str]:
    """A URL (or a comma-separated list of them) with one of `schemes`; "" stays "" (default)."""

    def parse(value: object) -> str:
        text = parse_str(value).strip()
        if not text:
            return ""
        for url in text.split(","):
            scheme, sep, rest = url.strip().partition("://")
            # The URL itself is not echoed: it may hold a password.
            if not sep or scheme.lower() not in schemes or not rest:
                raise ValueError(
                    f"must be a URL with a scheme in {', '.join(schemes)}, got scheme {scheme!r}"
                )
        return text

    return parse


def parse_group(value: object) -> str:
    """A group name ("" for the daemon's own group); whether it exists is checked at load."""
    text = parse_str(value).strip()
    if text and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", text):
        raise _reject("a group name (letters, digits, '_', '-', '.')", value)
    return text
