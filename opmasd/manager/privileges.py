"""What of an agent's capabilities and sandbox its runtime cannot enforce, refused at
registration and update naming the field (the values themselves are manager.validation's).

- Capabilities need opmasd to run as root under either runtime: giving an agent one is done by
  a privileged parent (systemd's system manager, or setpriv started by opmasd as root).
- The process runtime enforces only no_new_privileges (setpriv --no-new-privs); any other
  sandbox field set to anything but off would be stored and ignored there, so it is refused,
  with the advice to use the systemd runtime. Unset fields are its default: nothing applied.
"""

from __future__ import annotations

import os

from opmasd.core.model import AgentSpec, RuntimeKind
from opmasd.core.privileges import Sandbox

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
