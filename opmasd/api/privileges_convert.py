"""An agent's capabilities and sandbox between protobuf and the domain (core.privileges)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from opmas.v1 import agents_pb2 as pb
from opmasd.core.privileges import BOOL_FIELDS, MODE_FIELDS, Sandbox, normalise_capabilities, normalise_mode

SANDBOX_FIELDS = tuple(f.name for f in dataclasses.fields(Sandbox))
# The update_mask paths of these fields: the list, the whole sandbox, or one of its fields.
MASK_PATHS = ("capabilities", "sandbox", *(f"sandbox.{name}" for name in SANDBOX_FIELDS))


def privilege_fields(spec: pb.AgentSpec, named: Callable[[str, bool], bool]) -> dict[str, Any]:
    """The capabilities and sandbox fields a request sets (as spec_fields takes them: named
    says whether a path is set by the request). `sandbox` is a mapping of the Sandbox fields
    it changes: a field the request names but leaves unset goes back to the default."""
    out: dict[str, Any] = {}
    if named("capabilities", len(spec.capabilities) > 0):
        out["capabilities"] = normalise_capabilities(spec.capabilities)
    whole = named("sandbox", False)
    sandbox: dict[str, Any] = {}
    box = spec.sandbox
    present = {descriptor.name for descriptor, _ in box.ListFields()}
    for name in BOOL_FIELDS:
        is_set = name in present
        if whole or named(f"sandbox.{name}", is_set):
            sandbox[name] = getattr(box, name) if is_set else None
    for name in MODE_FIELDS:
        value = getattr(box, name)
        if whole or named(f"sandbox.{name}", bool(value)):
            sandbox[name] = normalise_mode(value)
    if sandbox or whole:
        out["sandbox"] = sandbox
    return out


def sandbox_to_pb(sandbox: Sandbox) -> pb.AgentSandbox:
    return pb.AgentSandbox(**sandbox.to_dict())
