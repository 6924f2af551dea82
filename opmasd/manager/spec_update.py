"""Spec patching: an agent spec with some of its fields replaced (registration defaults, updates)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from opmasd.core.errors import InvalidArgument
from opmasd.core.model import AgentSpec


def apply_fields(base: AgentSpec, fields: Mapping[str, Any]) -> AgentSpec:
    """base with the given fields replaced. `resources` and `sandbox` are
    themselves mappings of their fields."""
    known = {f.name for f in dataclasses.fields(AgentSpec)}
    changes: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in known:
            raise InvalidArgument.single(f"update_mask.{key}", "is not a field of the agent spec")
        if key in ("resources", "sandbox"):
            changes[key] = dataclasses.replace(getattr(base, key), **dict(value))
        elif key in ("environment", "labels"):
            changes[key] = tuple(sorted(dict(value).items()))
        elif key in ("command", "capabilities"):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)
