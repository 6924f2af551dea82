"""What of an agent's capabilities and sandbox its runtime cannot enforce, refused at
registration and update naming the field (the values themselves are manager.validation's).

- Capabilities need opmasd to run as root under either runtime: giving an agent one is done by
  a privileged parent (systemd's system manager, or setpriv started by opmasd as root).
- Under the process runtime, setpriv can keep only capabilities opmasd itself has, and drops
  the others only with CAP_SETPCAP: a named capability beyond opmasd's bounding set, or any
  without CAP_SETPCAP, is refused (the systemd runtime, where PID 1 gives them, has no such
  limit).
- The process runtime enforces only no_new_privileges (setpriv --no-new-privs); any other
  sandbox field set to anything but off would be stored and ignored there, so it is refused,
  with the advice to use the systemd runtime. Unset fields are its default: nothing applied.
"""

from __future__ import annotations

import functools
import os

from opmasd.core.model import AgentSpec, RuntimeKind
from opmasd.core.privileges import Sandbox, capability_mask

# The sandbox fields the process runtime can enforce.
PROCESS_SANDBOX_FIELDS = frozenset({"no_new_privileges"})


def privilege_refusals(spec: AgentSpec, euid: int | None = None) -> list[tuple[str, str]]:
    """(field, why) for each capability or sandbox setting the spec's runtime cannot enforce."""
    me = os.geteuid() if euid is None else euid
    refused: list[tuple[str, str]] = []
    if spec.capabilities and me != 0:
        refused.append(
            ("capabilities", f"opmasd runs as uid {me}, not root: it cannot give an agent capabilities")
        )
    if spec.runtime is RuntimeKind.PROCESS and spec.capabilities and me == 0:
        refused += _process_capability_refusals(spec.capabilities, held_capabilities())
    if spec.runtime is RuntimeKind.PROCESS:
        for name, value in _enabled(spec.sandbox):
            if name not in PROCESS_SANDBOX_FIELDS:
                refused.append(
                    (
                        f"sandbox.{name}",
                        f"{value} cannot be enforced by the process runtime; use runtime: systemd",
                    )
                )
    return refused


def _enabled(sandbox: Sandbox) -> list[tuple[str, str]]:
    """(field, value as shown) of each field set to something other than off."""
    return [
        (name, str(value).lower()) for name, value in sandbox.to_dict().items() if value not in (False, "no")
    ]


def _process_capability_refusals(
    wanted: tuple[str, ...], held: tuple[int, int] | None
) -> list[tuple[str, str]]:
    """Under the process runtime, setpriv (run by opmasd) gives the capabilities: it can keep
    only what opmasd's own bounding set has, and it needs CAP_SETPCAP to drop the rest (without
    it setpriv left the whole set, silently: the shipped unit lacked it)."""
    if held is None:
        return []  # /proc unreadable: setpriv's own error will say at start
    effective, bounding = held
    if not effective & capability_mask(["CAP_SETPCAP"]):
        why = "opmasd lacks CAP_SETPCAP, without which an agent's other capabilities cannot be dropped"
        return [("capabilities", f"{why}; use runtime: systemd")]
    beyond = [name for name in wanted if not bounding & capability_mask([name])]
    if beyond:
        return [
            ("capabilities", f"{', '.join(beyond)} not in opmasd's own bounding set; use runtime: systemd")
        ]
    return []


@functools.cache
def held_capabilities() -> tuple[int, int] | None:
    """opmasd's effective and bounding capability sets (fixed for its life), from /proc."""
    try:
        with open("/proc/self/status", "rb") as file:
            lines = file.read(1 << 16).decode("ascii", "replace").splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    try:
        return int(fields["CapEff"], 16), int(fields["CapBnd"], 16)
    except (KeyError, ValueError):
        return None
