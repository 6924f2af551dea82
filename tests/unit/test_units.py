"""opmas.units and opmas.local: the rules the daemon and opmasctl share."""

from __future__ import annotations

from pathlib import Path

import pytest

from opmas.local import default_runtime_dir, default_socket_path
from opmas.units import parse_bytes, parse_percent, parse_seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        ("10S", 10.0),
        ("-5", -5.0),
        ("-1m30s", -90.0),
        ("- 5m", -300.0),
        ("+5s", 5.0),
    ],
)
def test_parse_seconds(value: object, seconds: float) -> None:
    assert parse_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "s", "10x", "1h30", "--5", "-+5", "inf", "nan", "1e999", True, None])
def test_parse_seconds_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_seconds(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        ("0", 0),
        ("1024", 1024),
        ("512k", 512 << 10),
        ("10MiB", 10 << 20),
        ("10 MB", 10 << 20),
        ("1.5G", 3 << 29),
        ("0.5K", 512),
        ("18446744073709551615", 2**64 - 1),
    ],
)
def test_parse_bytes(value: object, size: int) -> None:
    assert parse_bytes(value) == size


# A fraction that does not come to whole bytes is refused, never silently rounded.
@pytest.mark.parametrize("value", ["", "K", "-1", "10X", ".5K", "1.5", "1.7K", "1.1G", 2.0, True, None])
def test_parse_bytes_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_bytes(value)


def test_runtime_dir_rule() -> None:
    assert default_runtime_dir({"RUNTIME_DIRECTORY": "/run/opmas:/run/other"}, 1000) == Path("/run/opmas")
    assert default_runtime_dir({"XDG_RUNTIME_DIR": "/run/user/0"}, 0) == Path("/run/opmas")
    assert default_runtime_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == Path("/run/user/1000/opmas")
    # A relative XDG_RUNTIME_DIR is invalid by the XDG spec and ignored.
    assert default_runtime_dir({"XDG_RUNTIME_DIR": "run"}, 1000) == Path("/tmp/opmas-1000")
    assert default_socket_path({}, 1000) == Path("/tmp/opmas-1000/opmasd.sock")


@pytest.mark.parametrize("value", ["1e3", "1_000", "\u0663", "inf", "nan", "--5", "5 parsecs", "1e3s"])
def test_parse_seconds_takes_plain_decimals_only(value: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_seconds(value)


@pytest.mark.parametrize("value", ["512i", "10Ki", "1Gi", "5 bytes"])
def test_parse_bytes_refuses_half_units(value: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_bytes(value)


def test_parse_percent() -> None:
    assert parse_percent("150%") == parse_percent(" 150 ") == parse_percent(150) == 150.0
    for bad in ("nan", "inf", "-1", "50%%", "1e2", "", True):
        with pytest.raises(ValueError, match="invalid percentage"):
            parse_percent(bad)
