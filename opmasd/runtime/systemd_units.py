"""systemd's side of an agent, as plain values: unit names, transient-unit properties, unit states.

No D-Bus here (runtime.systemd_dbus puts these values on the wire): names follow systemd's own
escaping, so that `systemctl status`, `journalctl -u` and the D-Bus object paths all agree on
them, and every unit property goes out with the exact D-Bus signature systemd expects.

Names: an agent's unit is `opmas-agent-<id escaped>.service`, escaped as `systemd-escape` does
(unit_name_escape in systemd's unit-name.c): '/' becomes '-'; ASCII letters, digits, ':', '_'
and '.' stay, except a leading '.'; every other byte of the UTF-8 text becomes `\\xNN`, '-'
included (`my-agent` → `opmas-agent-my\\x2dagent.service`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

UNIT_PREFIX = "opmas-agent-"
UNIT_SUFFIX = ".service"
UNIT_PATTERN = f"{UNIT_PREFIX}*{UNIT_SUFFIX}"  # for ListUnitsByPatterns
UNIT_NAME_MAX = 255  # systemd's UNIT_NAME_MAX - 1: the longest valid unit name
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
# systemd's "no value" for uint64 properties (MemoryCurrent, CPUUsageNSec, limits): infinity.
UINT64_MAX = 2**64 - 1

_KEPT = frozenset((string.ascii_letters + string.digits + ":_.").encode())
_HEX = frozenset(string.hexdigits.encode())
_LABEL_KEPT = frozenset((string.ascii_letters + string.digits).encode())


def systemd_escape(text: str) -> str:
    """The text escaped as `systemd-escape TEXT` prints it."""
    out = []
    for position, byte in enumerate(text.encode("utf-8")):
        if byte == ord("/"):
            out.append("-")
        elif byte in _KEPT and not (position == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def systemd_unescape(text: str) -> str:
    """The inverse of systemd_escape (`systemd-escape -u`); ValueError on a malformed escape."""
    raw = text.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == ord("-"):
            out.append(ord("/"))
        elif byte == ord("\\"):
            digits = raw[i + 2 : i + 4]
            if raw[i + 1 : i + 2] != b"x" or len(digits) != 2 or not set(digits) <= _HEX:
                raise ValueError(f"malformed escape in {text!r} at {i}")
            out.append(int(digits, 16))
            i += 3
        else:
            out.append(byte)
        i += 1
    return out.decode("utf-8")


def escape_unit_name(agent_id: str) -> str:
    """The agent's unit: `opmas-agent-<escaped id>.service`. ValueError when the id is empty or
    too long for a unit name once escaped."""
    if not agent_id:
        raise ValueError("an agent id must not be empty")
    name = f"{UNIT_PREFIX}{systemd_escape(agent_id)}{UNIT_SUFFIX}"
    if len(name) > UNIT_NAME_MAX:
        raise ValueError(f"agent id {agent_id[:40]!r} makes a unit name of {len(name)} characters (max 255)")
    return name


def agent_id_from_unit(unit: str) -> str | None:
    """The agent id whose unit this is; None for any other unit (or a name not escaped the way
    escape_unit_name escapes, so that the two are exact inverses)."""
    if not (unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX)):
        return None
    escaped = unit[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)]
    try:
        agent_id = systemd_unescape(escaped)
    except (ValueError, UnicodeDecodeError):
        return None
    return agent_id if agent_id and systemd_escape(agent_id) == escaped else None


def unit_object_path(unit: str) -> str:
    """The unit's D-Bus object path (sd-bus label escaping: each byte but [A-Za-z0-9] as _xx)."""
    label = "".join(chr(b) if b in _LABEL_KEPT else f"_{b:02x}" for b in unit.encode("utf-8"))
    return UNIT_PATH_PREFIX + (label or "_")


def unit_from_object_path(path: str) -> str | None:
    """The unit name of a unit object path; None for any other path."""
    if not path.startswith(UNIT_PATH_PREFIX):
        return None
    label = path[len(UNIT_PATH_PREFIX) :]
    if label == "_" or "/" in label:
        return None
    out = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_":
            digits = label[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits.encode()) <= _HEX:
                return None
            out.append(int(digits, 16))
            i += 3
        else:
            out.append(ord(label[i]))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- transient units ---------------------------------------------------------------------------

# (name, D-Bus signature, value): one entry of StartTransientUnit's `a(sv)`.
Property = tuple[str, str, object]


@dataclass(frozen=True)
class TransientUnit:
    """What an agent's transient service unit is made of.

    Durations are microseconds and sizes bytes, as systemd's properties take them; None leaves
    a limit unset (systemd's default: none). `extra` carries further properties as
    (name, signature, value), e.g. ("NoNewPrivileges", "b", True), ("ProtectSystem", "s",
    "strict"), ("AmbientCapabilities", "t", 1 << 13).
    """

    exec_start: tuple[str, ...]  # argv; argv[0] is the program (an absolute path)
    description: str = ""
    environment: Mapping[str, str] = field(default_factory=dict)
    working_directory: str | None = None
    user: str | None = None
    group: str | None = None
    memory_max: int | None = None
    cpu_quota_per_sec_usec: int | None = None  # 1_000_000 = one whole CPU
    tasks_max: int | None = None
    limit_nofile: int | None = None
    timeout_stop_usec: int = 10_000_000
    # Type=exec: the start job fails when the program cannot be executed, instead of "started".
    service_type: str = "exec"
    # opmasd's restart policy is the one source of truth: systemd never restarts on its own.
    restart: str = "no"
    kill_mode: str = "control-group"
    # Gone as soon as it stops, failed or not (a restart can reuse the name at once): its result
    # arrives in the PropertiesChanged signals before that.
    collect_mode: str = "inactive-or-failed"
    syslog_identifier: str | None = None
    # EnvironmentFile= paths, as the unit's systemd sees them (runtime.systemd_env writes them).
    environment_files: tuple[str, ...] = ()
    extra: tuple[Property, ...] = ()


def transient_properties(unit: TransientUnit) -> list[Property]:
    """The unit as StartTransientUnit's properties, each with its D-Bus signature."""
    if not unit.exec_start or not unit.exec_start[0]:
        raise ValueError("exec_start needs at least the program")
    for key in unit.environment:
        if not key or "=" in key:
            raise ValueError(f"environment variable name {key!r} is empty or holds '='")
    props: list[Property] = [
        ("Description", "s", unit.description),
        ("Type", "s", unit.service_type),
        _exec_start(unit),
        ("Environment", "as", [f"{k}={v}" for k, v in unit.environment.items()]),
        ("Restart", "s", unit.restart),
        ("KillMode", "s", unit.kill_mode),
        ("CollectMode", "s", unit.collect_mode),
        ("TimeoutStopUSec", "t", unit.timeout_stop_usec),
        ("StandardOutput", "s", "journal"),
        ("StandardError", "s", "journal"),
        # MemoryCurrent, CPUUsageNSec and TasksCurrent stay "[not set]" without these.
        ("MemoryAccounting", "b", True),
        ("CPUAccounting", "b", True),
        ("TasksAccounting", "b", True),
    ]
    optional: list[tuple[str, str, object]] = [
        ("WorkingDirectory", "s", unit.working_directory),
        ("User", "s", unit.user),
        ("Group", "s", unit.group),
        ("MemoryMax", "t", unit.memory_max),
        ("CPUQuotaPerSecUSec", "t", unit.cpu_quota_per_sec_usec),
        ("TasksMax", "t", unit.tasks_max),
        ("LimitNOFILE", "t", unit.limit_nofile),
        ("SyslogIdentifier", "s", unit.syslog_identifier),
    ]
    props += [p for p in optional if p[2] is not None]
    if unit.environment_files:
        props.append(("EnvironmentFiles", "a(sb)", [(path, False) for path in unit.environment_files]))
    names = {p[0] for p in props}
    for extra in unit.extra:
        if extra[0] in names:
            raise ValueError(f"extra property {extra[0]} is already set by a field of TransientUnit")
        names.add(extra[0])
        props.append(extra)
    return props


def exec_argument(arg: str) -> str:
    """An argument as ExecStart must carry it to reach the program unchanged: systemd replaces
    `$VAR`, `${VAR}` (and drops a lone `$VAR` that is unset) when it executes the unit, and
    `$$` is its `$`. Specifiers (`%n`) need nothing: systemd does not expand them in a property
    set over D-Bus, and escapes them itself when it writes the transient unit's file."""
    return arg.replace("$", "$$")


def _exec_start(unit: TransientUnit) -> Property:
    # Plain ExecStart: systemd 252 cannot read back the ExecStartEx= it writes for a transient
    # unit (LoadState=bad-setting after a daemon-reload).
    program, argv = unit.exec_start[0], [exec_argument(arg) for arg in unit.exec_start]
    return ("ExecStart", "a(sasb)", [(program, argv, False)])


# -- states ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitInfo:
    """One row of ListUnits / ListUnitsByPatterns."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str
    object_path: str
    job_id: int  # 0: no job queued


@dataclass(frozen=True)
class UnitState:
    """A service unit as systemd reports it now (GetAll on its Unit and Service interfaces)."""

    name: str
    load_state: str
    active_state: str  # active | activating | deactivating | inactive | failed | reloading
    sub_state: str  # running | exited | dead | failed | start | stop-sigterm | ...
    main_pid: int  # 0: none
    exec_main_code: int  # CLD_EXITED (1), CLD_KILLED (2), CLD_DUMPED (3); 0 before any exit
    exec_main_status: int  # the exit status, or the signal number when killed
    result: str  # success | exit-code | signal | core-dump | oom-kill | timeout | ...
    invocation_id: str  # hex, "" when none
    memory_current: int | None  # bytes; None when not accounted
    cpu_usage_nsec: int | None
    n_restarts: int
    # The unit's cgroup as systemd names it ("/system.slice/x.service"), relative to the
    # hierarchies' root; "" when it has none.
    control_group: str = ""
    description: str = ""  # carries the owning opmasd's mark (runtime.systemd_owner)


class ChangeKind(Enum):
    PROPERTIES = "properties"  # PropertiesChanged on the unit's object
    JOB_REMOVED = "job-removed"  # a job of the unit finished (job_result says how)
    UNIT_REMOVED = "unit-removed"  # the unit was unloaded (a transient one: collected)


@dataclass(frozen=True)
class UnitChange:
    """One signal about a unit. A field is None when this signal did not carry it:
    PropertiesChanged sends the Unit interface's and the Service interface's changes apart."""

    unit: str
    kind: ChangeKind
    active_state: str | None = None
    sub_state: str | None = None
    main_pid: int | None = None
    exec_main_code: int | None = None
    exec_main_status: int | None = None
    result: str | None = None
    job_id: int | None = None
    job_result: str | None = None  # done | canceled | timeout | failed | dependency | skipped


def _int(props: Mapping[str, object], key: str) -> int | None:
    value = props.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(props: Mapping[str, object], key: str) -> str | None:
    value = props.get(key)
    return value if isinstance(value, str) else None


def _accounted(props: Mapping[str, object], key: str) -> int | None:
    value = _int(props, key)
    return None if value is None or value == UINT64_MAX else value


def unit_state(name: str, props: Mapping[str, object]) -> UnitState:
    """A UnitState from the merged properties of the Unit and Service interfaces (plain values)."""
    invocation = props.get("InvocationID")
    return UnitState(
        name=name,
        load_state=_str(props, "LoadState") or "",
        active_state=_str(props, "ActiveState") or "",
        sub_state=_str(props, "SubState") or "",
        main_pid=_int(props, "MainPID") or 0,
        exec_main_code=_int(props, "ExecMainCode") or 0,
        exec_main_status=_int(props, "ExecMainStatus") or 0,
        result=_str(props, "Result") or "",
        invocation_id=bytes(invocation).hex() if isinstance(invocation, bytes | bytearray | list) else "",
        memory_current=_accounted(props, "MemoryCurrent"),
        cpu_usage_nsec=_accounted(props, "CPUUsageNSec"),
        n_restarts=_int(props, "NRestarts") or 0,
        control_group=_str(props, "ControlGroup") or "",
        description=_str(props, "Description") or "",
    )


def properties_change(unit: str, props: Mapping[str, object]) -> UnitChange:
    """The UnitChange of one PropertiesChanged signal (its changed properties, plain values)."""
    return UnitChange(
        unit=unit,
        kind=ChangeKind.PROPERTIES,
        active_state=_str(props, "ActiveState"),
        sub_state=_str(props, "SubState"),
        main_pid=_int(props, "MainPID"),
        exec_main_code=_int(props, "ExecMainCode"),
        exec_main_status=_int(props, "ExecMainStatus"),
        result=_str(props, "Result"),
    )
