"""A manifest's `capabilities:` and `sandbox:` keys, read into core.privileges values.

    capabilities: [CAP_NET_RAW]     # or net_raw; none named: none kept (systemd runtime)
    sandbox: {protect_system: strict, private_devices: true, no_new_privileges: true}

YAML reads `yes`/`no` as booleans: for protect_system and protect_home they mean "yes"/"no";
the other sandbox keys take true or false only. Values are checked with the rest of the spec
(manager.validation), which names the field.
"""

from __future__ import annotations

from typing import Any

from opmas.units import shown
from opmasd.core.privileges import (
    BOOL_FIELDS,
    MAX_CAPABILITIES,
    MODE_FIELDS,
    Sandbox,
    normalise_capabilities,
    normalise_mode,
)


def capabilities_from(value: Any) -> tuple[str, ...]:
    """capabilities: a list of names (a single name alone is taken as a list of one)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"capabilities: must be a list of names like CAP_NET_RAW, got {shown(value)}")
    if len(items) > MAX_CAPABILITIES:
        raise ValueError(f"capabilities: has {len(items)} entries; at most {MAX_CAPABILITIES}")
    return normalise_capabilities(items)


def sandbox_from(value: Any) -> Sandbox:
    """sandbox: a mapping of Sandbox fields."""
    if value is None:
        return Sandbox()
    if not isinstance(value, dict):
        raise ValueError(f"sandbox: must be a mapping, got {shown(value)}")
    unknown = sorted(str(k) for k in value if k not in BOOL_FIELDS and k not in MODE_FIELDS)
    if unknown:
        known = ", ".join((*MODE_FIELDS, *BOOL_FIELDS))
        raise ValueError(f"sandbox: unknown key(s): {', '.join(unknown)[:200]} (known: {known})")
    fields: dict[str, Any] = {}
    for key, item in value.items():
        if key in MODE_FIELDS:
            if isinstance(item, bool):
                item = "yes" if item else "no"
            if not isinstance(item, str):
                raise ValueError(f"sandbox.{key}: must be one of {', '.join(MODE_FIELDS[key])}")
            fields[key] = normalise_mode(item)
        elif not isinstance(item, bool):
            raise ValueError(f"sandbox.{key}: must be true or false, got {shown(item)}")
        else:
            fields[key] = item
    return Sandbox(**fields)
