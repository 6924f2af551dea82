"""An agent's capabilities and sandbox as properties of its transient unit, with safe defaults.

A field the spec leaves unset takes DEFAULTS: NoNewPrivileges, PrivateTmp, ProtectSystem=full,
ProtectHome=read-only, ProtectKernelTunables, ProtectKernelModules and ProtectControlGroups.
ProtectSystem=full, not strict: strict leaves an agent only /dev, /proc, /sys and its working
directory to write, and agents keep state and caches elsewhere too (/var/lib, /var/cache,
/srv); full keeps /usr, /boot, /efi and /etc read-only, which no agent has a reason to write.
An agent that asks for strict gets its working directory writable (ReadWritePaths), unless
that is "/". PrivateDevices stays off by default: it also drops CAP_SYS_RAWIO and CAP_MKNOD
and hides device nodes an agent may be written to read (a serial console, a tun device).

Capabilities: CapabilityBoundingSet is exactly the named ones (none named: empty, so a root
agent has no capability either: the shipped agents need none), and AmbientCapabilities the same
for an agent whose user is not root, so that `user: nobody` with CAP_NET_RAW can open a raw
ICMP socket. Signatures as systemd 252's D-Bus API takes them (org.freedesktop.systemd1.Service:
the capability sets `t` bit masks, the booleans `b`, ProtectSystem/ProtectHome `s`,
ReadWritePaths `as`).
"""

from __future__ import annotations

import os

from opmasd.core.accounts import uid_of
from opmasd.core.privileges import Sandbox, capability_mask
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.systemd_units import Property

DEFAULTS = Sandbox(
    no_new_privileges=True,
    protect_system="full",
    protect_home="read-only",
    private_tmp=True,
    private_devices=False,
    protect_kernel_tunables=True,
    protect_kernel_modules=True,
    protect_control_groups=True,
)
# Sandbox field → the unit property it sets.
_BOOLEANS = (
    ("no_new_privileges", "NoNewPrivileges"),
    ("private_tmp", "PrivateTmp"),
    ("private_devices", "PrivateDevices"),
    ("protect_kernel_tunables", "ProtectKernelTunables"),
    ("protect_kernel_modules", "ProtectKernelModules"),
    ("protect_control_groups", "ProtectControlGroups"),
)


def sandbox_properties(request: LaunchRequest, euid: int | None = None) -> tuple[Property, ...]:
    """The unit properties of the request's capabilities and sandbox (defaults filled in).
    Not as root (a user manager, untested here), the empty bounding set is left out: such a
    manager cannot drop capabilities, and its units have none to drop."""
    sandbox = request.sandbox.with_defaults(DEFAULTS)
    mask = capability_mask(request.capabilities)
    root = (os.geteuid() if euid is None else euid) == 0
    props: list[Property] = [("CapabilityBoundingSet", "t", mask)] if mask or root else []
    if mask and _non_root(request.user):
        props.append(("AmbientCapabilities", "t", mask))
    props += [(prop, "b", bool(getattr(sandbox, name))) for name, prop in _BOOLEANS]
    props += [("ProtectSystem", "s", sandbox.protect_system), ("ProtectHome", "s", sandbox.protect_home)]
    workdir = request.working_directory or "/"
    if sandbox.protect_system == "strict" and workdir != "/":
        # "-": a directory systemd cannot see is no error of this property's (WorkingDirectory
        # reports it, when it is one).
        props.append(("ReadWritePaths", "as", [f"-{workdir}"]))
    return tuple(props)


def _non_root(user: str) -> bool:
    """Whether the user (a name or uid; "": opmasd's own, root for the system manager) is not root."""
    if not user:
        return False
    uid = uid_of(user)
    # Unknown here: systemd will refuse it anyway, and never as root.
    return uid is None or uid != 0
