"""What privileges an agent keeps: its Linux capabilities and its sandboxing, as plain values.

Capabilities are kept in their canonical form (`CAP_NET_RAW`); `net_raw` and `cap_net_raw`
are normalised to it where a spec comes in (the API, a manifest), and an unknown name is kept
as given so that validation can name it. A Sandbox field that is None (or "") is not set: the
runtime's default applies, which is not the same as set to off (systemd's defaults here are on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Linux's capability numbers (linux/capability.h, up to 6.x: CAP_LAST_CAP is 40).
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_KILL "
            "CAP_SETGID CAP_SETUID CAP_SETPCAP CAP_LINUX_IMMUTABLE CAP_NET_BIND_SERVICE "
            "CAP_NET_BROADCAST CAP_NET_ADMIN CAP_NET_RAW CAP_IPC_LOCK CAP_IPC_OWNER CAP_SYS_MODULE "
            "CAP_SYS_RAWIO CAP_SYS_CHROOT CAP_SYS_PTRACE CAP_SYS_PACCT CAP_SYS_ADMIN CAP_SYS_BOOT "
            "CAP_SYS_NICE CAP_SYS_RESOURCE CAP_SYS_TIME CAP_SYS_TTY_CONFIG CAP_MKNOD CAP_LEASE "
            "CAP_AUDIT_WRITE CAP_AUDIT_CONTROL CAP_SETFCAP CAP_MAC_OVERRIDE CAP_MAC_ADMIN "
            "CAP_SYSLOG CAP_WAKE_ALARM CAP_BLOCK_SUSPEND CAP_AUDIT_READ CAP_PERFMON CAP_BPF "
            "CAP_CHECKPOINT_RESTORE"
        ).split()
    )
}
# More entries than there are capabilities is hostile or a mistake; bounded before any work.
MAX_CAPABILITIES = 64
_MAX_NAME = 40  # of a name quoted back in a refusal

PROTECT_SYSTEM_MODES = ("no", "yes", "full", "strict")
PROTECT_HOME_MODES = ("no", "yes", "read-only", "tmpfs")
_MODE_WORDS = {"off": "no", "false": "no", "on": "yes", "true": "yes"}


def normalise_capability(name: str) -> str:
    """`CAP_NET_RAW` for `net_raw`, `cap_net_raw` or `CAP_NET_RAW` (any other text upper-cased)."""
    upper = name.strip().upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def normalise_capabilities(names: Iterable[str]) -> tuple[str, ...]:
    """The names normalised, each once, sorted (the same set, the same stored text). Beyond
    MAX_CAPABILITIES + 1 entries the rest is dropped unread: validation refuses the list anyway."""
    out: set[str] = set()
    for count, name in enumerate(names):
        if count > MAX_CAPABILITIES:
            break
        out.add(normalise_capability(name[: _MAX_NAME * 2]))
    return tuple(sorted(out))


def capability_errors(names: tuple[str, ...]) -> list[str]:
    """What is wrong with a list of capabilities (normalised); empty when it is valid."""
    if len(names) > MAX_CAPABILITIES:
        return [f"has more than {MAX_CAPABILITIES} entries"]
    return [
        f"{name[:_MAX_NAME]!r} is not a Linux capability (e.g. CAP_NET_RAW)"
        for name in names
        if name not in CAPABILITIES
    ]


def capability_mask(names: Iterable[str]) -> int:
    """The capabilities as a bit mask (systemd's CapabilityBoundingSet `t`); unknown names are
    a KeyError (validation refused them)."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITIES[name]
    return mask


def normalise_mode(value: str) -> str:
    """A ProtectSystem/ProtectHome value in systemd's words: off/false → no, on/true → yes."""
    lowered = value.strip().lower()
    return _MODE_WORDS.get(lowered, lowered)


@dataclass(frozen=True)
class Sandbox:
    """Sandboxing settings, systemd's exec options of the same names; None/"": not set."""

    no_new_privileges: bool | None = None
    protect_system: str = ""  # one of PROTECT_SYSTEM_MODES
    protect_home: str = ""  # one of PROTECT_HOME_MODES
    private_tmp: bool | None = None
    private_devices: bool | None = None
    protect_kernel_tunables: bool | None = None
    protect_kernel_modules: bool | None = None
    protect_control_groups: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (for the store and for manifests)."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None and value != ""
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sandbox:
        """The inverse of to_dict (for the store's own rows: unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def with_defaults(self, defaults: Sandbox) -> Sandbox:
        """Every field not set taken from defaults."""
        unset = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) in (None, "")]
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in unset})


BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(Sandbox) if f.type == "bool | None")
MODE_FIELDS = {"protect_system": PROTECT_SYSTEM_MODES, "protect_home": PROTECT_HOME_MODES}


def sandbox_errors(sandbox: Sandbox) -> list[tuple[str, str]]:
    """(field, why) for each value that is not one of its field's modes."""
    out: list[tuple[str, str]] = []
    for name, modes in MODE_FIELDS.items():
        value = getattr(sandbox, name)
        if value and value not in modes:
            out.append((name, f"{value[:_MAX_NAME]!r} is not one of {', '.join(modes)}"))
    return out
