"""How OPMAS writes durations and byte sizes: one reading shared by the daemon and the client.

The daemon's config and agent manifests and opmasctl's flags all go through `parse_seconds` and
`parse_bytes`, so a value an operator pastes from one into another means the same thing. Those
two say only whether the text is a duration or a size. The bounds are the callers': opmasctl
sets its own; `parse_duration` and `parse_size` are the ones the config and manifests share,
worded as the config's other value parsers are ("must be ..., got ...").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from fractions import Fraction

__all__ = ["parse_bytes", "parse_duration", "parse_percent", "parse_seconds", "parse_size"]

_SECONDS_PER = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Plain decimal numbers only: no exponents, underscores, signs or non-ASCII digits (which
# float() would take).
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)")

# Binary multiples whatever the spelling ("K", "KB", "KiB"), as systemd reads MemoryMax= and
# friends: nobody means a memory or log cap in powers of ten.
_BYTES_PER = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(?:i?b)?")


def shown(value: object) -> str:
    """A value for an error message: a scalar's start only (it may be a file's content, or
    huge), a container by its type."""
    text = (
        repr(value) if isinstance(value, str | int | float | bool) or value is None else type(value).__name__
    )
    return text if len(text) <= 40 else f"{text[:37]}..."


def _invalid_duration(value: object) -> ValueError:
    return ValueError(
        f"invalid duration {shown(value)}: expected seconds or a value such as 500ms, 10s, 5m, 1h"
    )


def _unsigned_seconds(text: str) -> float | None:
    if _NUMBER.fullmatch(text):
        return float(text)  # a bare number is seconds
    # Compound forms like "1m30s" or "1h 30m" are accepted, as systemd does for its time spans.
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if text[position : match.start()].strip():
            return None
        total += float(match.group(1)) * _SECONDS_PER[match.group(2)]
        position = match.end()
    if position == 0 or text[position:].strip():
        return None
    return total


def parse_seconds(value: object) -> float:
    """Seconds from a number or "1.5", "500ms", "10s", "5m", "1h", "1d", "1m30s" (any case).

    A leading sign is kept: whether a negative value is allowed is the caller's call (the
    client leaves it to the server to judge). Infinity and NaN are never durations.
    """
    seconds: float | None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.removeprefix("-") if sign < 0 else text.removeprefix("+")
        unsigned = _unsigned_seconds(text.strip())
        seconds = None if unsigned is None else sign * unsigned
    else:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise _invalid_duration(value)
    return seconds


def parse_bytes(value: object) -> int:
    """Bytes from an integer or "1048576", "512K", "10MiB", "1.5G", "100B" (any case).

    A fraction must come to whole bytes ("1.5K" is 1536; "1.7K" and "1.5" are refused rather
    than silently rounded). A float is refused: a size is an integer, or a string.
    There is no bound here; the callers set theirs (> 0 for a config cap, uint64 for the API).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if match:
            # Exact arithmetic: a float product could be a byte off for long fractions.
            exact = Fraction(match.group(1)) * _BYTES_PER[match.group(2)]
            if exact.denominator == 1:
                return exact.numerator
    raise ValueError(f"invalid size {shown(value)}: expected bytes or a value such as 512K, 512M, 1G")


def parse_duration(*, positive: bool) -> Callable[[object], float]:
    """Seconds >= 0 (or > 0 when `positive`), for the daemon's config and agent manifests."""
    bound = "> 0" if positive else ">= 0"
    expectation = f'a duration {bound} (seconds, or like "500ms", "10s", "5m", "1h")'

    def parse(value: object) -> float:
        try:
            seconds = parse_seconds(value)
        except ValueError:
            seconds = None
        if seconds is None or seconds < 0 or (positive and seconds == 0):
            raise ValueError(f"must be {expectation}, got {shown(value)}")
        return seconds

    return parse


def parse_size(value: object) -> int:
    """Bytes > 0, for the daemon's config and agent manifests ("512K", "10MiB", "1G", 1048576)."""
    try:
        size = parse_bytes(value)
    except ValueError:
        size = None
    if size is None or size < 1:
        raise ValueError(
            f'must be a size in bytes > 0 (a number, or like "512K", "10MiB", "1G"), got {shown(value)}'
        )
    return size


def parse_percent(value: object) -> float:
    """A CPU quota in percent of one CPU, >= 0: 50, "50", "150%", "1.5" (200 means two CPUs)."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        if _NUMBER.fullmatch(text):
            number = float(text)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"invalid percentage {shown(value)}: expected a number >= 0 such as 50 or 150%")
    return number
