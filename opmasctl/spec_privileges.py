"""The capability and sandbox flags of `agents register` and `agents update`.

--capability NAME (repeatable): the given ones become the agent's whole list (`update
--no-capabilities`: none). --sandbox KEY=VALUE (repeatable) sets one sandbox field; the value
`default` puts it back to the runtime's default. opmasd normalises and checks the values.
"""

from __future__ import annotations

import argparse

from opmas.v1 import agents_pb2

BOOL_KEYS = (
    "no_new_privileges",
    "private_tmp",
    "private_devices",
    "protect_kernel_tunables",
    "protect_kernel_modules",
    "protect_control_groups",
)
MODE_KEYS = ("protect_system", "protect_home")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


class PrivilegeFlagError(ValueError):
    """A --sandbox flag that does not parse; reported as a usage error."""


def add_privilege_arguments(group: argparse._ArgumentGroup, *, update: bool) -> None:
    group.add_argument(
        "--capability",
        dest="spec_capabilities",
        action="append",
        metavar="CAP",
        help="a Linux capability the agent keeps, e.g. CAP_NET_RAW or net_raw (repeatable; "
        "the given ones are all it keeps; opmasd must be root)",
    )
    if update:
        group.add_argument(
            "--no-capabilities",
            dest="spec_no_capabilities",
            action="store_true",
            help="the agent keeps no capability",
        )
    group.add_argument(
        "--sandbox",
        dest="spec_sandbox",
        action="append",
        metavar="KEY=VALUE",
        help=f"a sandbox setting (repeatable): {', '.join(MODE_KEYS)} (no, yes, full, strict; "
        f"no, yes, read-only, tmpfs) or {', '.join(BOOL_KEYS)} (yes or no); "
        "VALUE default: the runtime's default",
    )


def apply_privilege_flags(args: argparse.Namespace, spec: agents_pb2.AgentSpec) -> list[str]:
    """Sets the flags' fields on spec; the update_mask paths they name."""
    paths: list[str] = []
    caps = getattr(args, "spec_capabilities", None)
    if getattr(args, "spec_no_capabilities", False):
        if caps:
            raise PrivilegeFlagError("--capability and --no-capabilities cannot be combined")
        paths.append("capabilities")
    elif caps is not None:
        spec.capabilities.extend(caps)
        paths.append("capabilities")
    for item in getattr(args, "spec_sandbox", None) or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        value = value.strip()
        if not sep or key not in (*MODE_KEYS, *BOOL_KEYS):
            known = ", ".join((*MODE_KEYS, *BOOL_KEYS))
            raise PrivilegeFlagError(f"--sandbox {item!r}: expected KEY=VALUE with KEY one of {known}")
        paths.append(f"sandbox.{key}")
        if value.lower() == "default":
            continue
        if key in MODE_KEYS:
            setattr(spec.sandbox, key, value)
        elif value.lower() in _TRUE + _FALSE:
            setattr(spec.sandbox, key, value.lower() in _TRUE)
        else:
            raise PrivilegeFlagError(f"--sandbox {item!r}: {key} takes yes or no")
    return paths


def privilege_pairs(spec: agents_pb2.AgentSpec) -> list[tuple[str, str]]:
    """What `agents get` shows of them."""
    caps = " ".join(spec.capabilities) or "(none)"
    present = {descriptor.name: value for descriptor, value in spec.sandbox.ListFields()}
    shown = [
        f"{key}={('yes' if value else 'no') if isinstance(value, bool) else value}"
        for key, value in present.items()
    ]
    return [("Capabilities", caps), ("Sandbox", " ".join(shown) or "(runtime defaults)")]
