"""Parsers for the human units of config files and manifests: durations and byte sizes."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "500ms", "10s", "5m", "1h", "1d".

    Negative numbers are returned as they are (callers decide whether that is allowed);
    anything else unreadable raises ValueError.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            return -parse_duration(text[1:])
        match = _DURATION.match(text)
        if match:
            return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]
    raise ValueError(f"expected a duration such as 10, '500ms', '10s', '5m' or '1h', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from a number or a string like "512K", "10MiB", "1G" (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * 1024 ** _SIZE_POWERS[match.group(2).lower()])
    raise ValueError(f"expected a size such as 1048576, '512K', '10MiB' or '1G', got {value!r}")
