"""Parsers for command-line values: durations, byte sizes, KEY=VALUE pairs, enum names.

Each raises ValueError with a message fit for a usage error; argparse wrappers turn that into
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from google.protobuf import duration_pb2, struct_pb2

from opmas import units

_UINT64_MAX = 2**64 - 1
# The daemon's agent-id grammar (opmasd/core/ids.py; opmasctl imports only the opmas package):
# 1-63 of [a-z0-9_-] from a letter or digit, the manager's own subject tokens reserved.
_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_RESERVED_AGENT_IDS = frozenset({"manager", "status", "metrics", "node", "events"})

T = TypeVar("T")
E = TypeVar("E", bound=int)


def parse_seconds(text: str) -> float:
    """Seconds from "30", "1.5", "500ms", "10s", "5m", "1h", "1m30s"; a leading minus is kept."""
    # The daemon's own reading (opmas.units), so a value pasted from a manifest means the same.
    return units.parse_seconds(text)


def parse_duration(text: str) -> duration_pb2.Duration:
    """A google.protobuf.Duration; negative values pass through for the server to judge."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(parse_seconds(text) * 1_000_000_000))
    return duration


def parse_size(text: str) -> int:
    """Bytes from "1048576", "512K", "512M", "1G", "10MiB" (powers of 1024, as systemd's MemoryMax)."""
    size = units.parse_bytes(text)
    if size > _UINT64_MAX:  # the API's byte counts are uint64
        raise ValueError(f"invalid size {text!r}: too large")
    return size


def parse_agent_id(text: str) -> str:
    """An agent id as the daemon's grammar has it (a token id fits it too); ValueError otherwise."""
    if not text:
        raise ValueError("an agent id must not be empty")
    if not _AGENT_ID.match(text):
        raise ValueError(
            f"invalid agent id {text[:80]!r}: use 1-63 characters of a-z, 0-9, '-', '_', "
            "starting with a letter or digit"
        )
    if text in _RESERVED_AGENT_IDS:
        raise ValueError(f"invalid agent id {text!r}: reserved for opmasd's own NATS subjects")
    return text


def split_pair(text: str, what: str) -> tuple[str, str]:
    """KEY=VALUE → (KEY, VALUE); the value may be empty or contain '='."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"invalid {what} {text!r}: expected KEY=VALUE")
    return key.strip(), value


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, value = split_pair(pair, "--env")
        if "\0" in key or "\0" in value:
            raise ValueError(f"invalid --env {pair!r}: NUL characters are not allowed")
        env[key] = value
    return env


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """--label KEY=VALUE pairs; their grammar is the daemon's to check (it names the bad one)."""
    return dict(split_pair(pair, "--label") for pair in pairs)


def parse_params(pairs: Iterable[str]) -> struct_pb2.Struct:
    """--param k=v pairs into a Struct: a value that parses as JSON is taken as JSON (42, true,
    [1,2], {"a":1}), anything else as a plain string, so `--param host=r1` needs no quoting."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, raw = split_pair(pair, "--param")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    struct = struct_pb2.Struct()
    struct.update(params)
    return struct


def enum_choices(items: Iterable[tuple[str, E]], prefix: str) -> dict[str, E]:
    """CLI spellings of a proto enum's values: AGENT_STATE_RUNNING → "running",
    RESTART_POLICY_ON_FAILURE → "on-failure"; the UNSPECIFIED value is left out."""
    return {
        name.removeprefix(prefix).lower().replace("_", "-"): value
        for name, value in items
        if not name.endswith("_UNSPECIFIED")
    }


def argtype(parser: Callable[[str], T]) -> Callable[[str], T]:
    """Wraps a parser for argparse's type=, keeping our message instead of argparse's generic one."""

    def convert(text: str) -> T:
        try:
            return parser(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parser.__name__
    return convert
