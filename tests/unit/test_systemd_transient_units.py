"""Agent unit names, transient-unit properties and unit states (runtime.systemd_units), and the
errors of the D-Bus client that need no systemd (runtime.systemd_dbus).

Names are checked against the `systemd-escape` binary itself, so that `systemctl status`,
`journalctl -u` and opmasd always agree on an agent's unit.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from dbus_fast import Message, Variant

from opmasd.runtime.systemd_dbus import (
    DISCONNECTED,
    INVALID_ARGS,
    NO_REPLY,
    NO_SERVER,
    SystemdError,
    SystemdManager,
    bus_address,
)
from opmasd.runtime.systemd_units import (
    UINT64_MAX,
    ChangeKind,
    TransientUnit,
    agent_id_from_unit,
    escape_unit_name,
    properties_change,
    systemd_escape,
    systemd_unescape,
    transient_properties,
    unit_from_object_path,
    unit_object_path,
    unit_state,
)

AWKWARD_IDS = [
    "sysmon",
    "device-liveness",  # '-' is escaped: it means '/' in an unescaped name
    "auth_failures_2",
    "a.b.c",
    ".hidden",  # a leading '.' is escaped, later ones are not
    "..",
    "-leading-dash",
    "trailing-",
    "with/slash",
    "/leading/slash/",
    "with space",
    "tab\tand\nnewline",
    "back\\slash",
    "colon:ok",
    "percent%and@at",
    "ünïcödé",
    "日本",
    "emoji-🙂",
    "x" * 50,
]


def escape_binary(*args: str) -> str:
    if shutil.which("systemd-escape") is None:
        pytest.fail("systemd-escape is needed to check unit names (apt-get install systemd)")
    return subprocess.run(
        ["systemd-escape", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("agent_id", AWKWARD_IDS)
def test_unit_names_escape_as_systemd_escape_does(agent_id: str) -> None:
    assert systemd_escape(agent_id) == escape_binary("--", agent_id)
    assert escape_unit_name(agent_id) == f"opmas-agent-{escape_binary('--', agent_id)}.service"
    assert systemd_unescape(systemd_escape(agent_id)) == escape_binary("-u", "--", systemd_escape(agent_id))


@pytest.mark.parametrize("agent_id", AWKWARD_IDS)
def test_the_agent_id_comes_back_from_its_unit(agent_id: str) -> None:
    assert agent_id_from_unit(escape_unit_name(agent_id)) == agent_id


@pytest.mark.parametrize(
    "unit",
    [
        "sshd.service",
        "opmas-agent-.service",  # no id
        "opmas-agent-x.scope",
        "opmas-agent-\\xzz.service",  # malformed escape
        "opmas-agent-\\x61.service",  # 'a' escaped: not how escape_unit_name writes it
        "opmas-agent-\\xff.service",  # not UTF-8
    ],
)
def test_other_units_have_no_agent_id(unit: str) -> None:
    assert agent_id_from_unit(unit) is None


def test_a_name_too_long_or_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        escape_unit_name("")
    assert len(escape_unit_name("a" * 235)) == 255
    with pytest.raises(ValueError, match="max 255"):
        escape_unit_name("a" * 236)
    with pytest.raises(ValueError, match="max 255"):
        escape_unit_name("-" * 60)  # 240 characters once escaped
    with pytest.raises(ValueError, match="malformed"):
        systemd_unescape("\\x4")


def test_object_paths_use_sd_bus_label_escaping() -> None:
    # As systemd 252 names it on the bus (seen in the sandbox).
    unit = "opmas-agent-demo\\x2d1.service"
    assert unit_object_path(unit) == "/org/freedesktop/systemd1/unit/opmas_2dagent_2ddemo_5cx2d1_2eservice"
    for agent_id in AWKWARD_IDS:
        name = escape_unit_name(agent_id)
        assert unit_from_object_path(unit_object_path(name)) == name
    assert unit_from_object_path("/org/freedesktop/systemd1/job/12") is None
    assert unit_from_object_path("/org/freedesktop/systemd1/unit/bad_zz") is None


def test_every_property_goes_out_with_its_signature() -> None:
    unit = TransientUnit(
        exec_start=("/usr/bin/python3", "-m", "agent"),
        description="an agent",
        environment={"AGENT_ID": "a", "EMPTY": ""},
        working_directory="/srv/a",
        user="nobody",
        group="nogroup",
        memory_max=64 << 20,
        cpu_quota_per_sec_usec=500_000,
        tasks_max=32,
        limit_nofile=1024,
        timeout_stop_usec=5_000_000,
        syslog_identifier="opmas-agent-a",
        extra=(("NoNewPrivileges", "b", True), ("ProtectSystem", "s", "strict")),
    )
    props = {name: (sig, value) for name, sig, value in transient_properties(unit)}
    assert props == {
        "Description": ("s", "an agent"),
        "Type": ("s", "exec"),
        "ExecStart": ("a(sasb)", [("/usr/bin/python3", ["/usr/bin/python3", "-m", "agent"], False)]),
        "Environment": ("as", ["AGENT_ID=a", "EMPTY="]),
        "Restart": ("s", "no"),
        "KillMode": ("s", "control-group"),
        "CollectMode": ("s", "inactive-or-failed"),
        "TimeoutStopUSec": ("t", 5_000_000),
        "StandardOutput": ("s", "journal"),
        "StandardError": ("s", "journal"),
        "MemoryAccounting": ("b", True),
        "CPUAccounting": ("b", True),
        "TasksAccounting": ("b", True),
        "WorkingDirectory": ("s", "/srv/a"),
        "User": ("s", "nobody"),
        "Group": ("s", "nogroup"),
        "MemoryMax": ("t", 64 << 20),
        "CPUQuotaPerSecUSec": ("t", 500_000),
        "TasksMax": ("t", 32),
        "LimitNOFILE": ("t", 1024),
        "SyslogIdentifier": ("s", "opmas-agent-a"),
        "NoNewPrivileges": ("b", True),
        "ProtectSystem": ("s", "strict"),
    }
    # The whole call marshals: every value fits its signature.
    body = ["opmas-agent-a.service", "fail", [[k, Variant(s, v)] for k, (s, v) in props.items()], []]
    message = Message(destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                      interface="org.freedesktop.systemd1.Manager", member="StartTransientUnit",
                      signature="ssa(sv)a(sa(sv))", body=body)  # fmt: skip
    assert len(message._marshall(False)) > 0


def test_unset_limits_are_left_out_and_conflicts_refused() -> None:
    names = [p[0] for p in transient_properties(TransientUnit(("/bin/true",)))]
    for unset in (
        "MemoryMax",
        "CPUQuotaPerSecUSec",
        "TasksMax",
        "LimitNOFILE",
        "User",
        "Group",
        "WorkingDirectory",
    ):
        assert unset not in names
    with pytest.raises(ValueError, match="already set"):
        transient_properties(TransientUnit(("/bin/true",), extra=(("Restart", "s", "always"),)))
    with pytest.raises(ValueError, match="already set"):
        transient_properties(TransientUnit(("/bin/true",), memory_max=1, extra=(("MemoryMax", "t", 2),)))
    with pytest.raises(ValueError, match="program"):
        transient_properties(TransientUnit(()))
    with pytest.raises(ValueError, match="environment"):
        transient_properties(TransientUnit(("/bin/true",), environment={"A=B": "c"}))


def test_unit_state_from_properties() -> None:
    state = unit_state(
        "u.service",
        {
            "LoadState": "loaded", "ActiveState": "failed", "SubState": "failed", "MainPID": 0,
            "ExecMainCode": 1, "ExecMainStatus": 3, "Result": "exit-code",
            "InvocationID": bytes(range(16)), "MemoryCurrent": UINT64_MAX, "CPUUsageNSec": 1234,
            "NRestarts": 2,
        },
    )  # fmt: skip
    assert (state.active_state, state.exec_main_code, state.exec_main_status, state.result) == (
        "failed", 1, 3, "exit-code",
    )  # fmt: skip
    assert state.invocation_id == bytes(range(16)).hex()
    assert state.memory_current is None  # [not set]
    assert state.cpu_usage_nsec == 1234 and state.n_restarts == 2
    change = properties_change("u.service", {"MainPID": 42, "Result": "success"})
    assert (change.kind, change.main_pid, change.result, change.active_state) == (
        ChangeKind.PROPERTIES, 42, "success", None,
    )  # fmt: skip


def test_bus_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert bus_address("system") == "unix:path=/run/dbus/system_bus_socket"
    assert bus_address("user") == "unix:path=/run/user/1000/bus"
    assert bus_address("unix:path=/x") == "unix:path=/x"


async def test_no_bus_is_no_server(tmp_path: Path) -> None:
    manager = SystemdManager(timeout=2)
    with pytest.raises(SystemdError) as caught:
        await manager.connect(f"unix:path={tmp_path}/none")
    assert caught.value.name == NO_SERVER
    with pytest.raises(SystemdError) as caught:
        await manager.stop_unit("x.service")
    assert caught.value.name == DISCONNECTED


async def test_a_bus_that_never_answers_times_out(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the handshake, answers nothing
        writer.close()

    server = await asyncio.start_unix_server(silent, path=str(tmp_path / "bus"))
    try:
        manager = SystemdManager(timeout=0.3)
        with pytest.raises(SystemdError) as caught:
            await manager.connect(f"unix:path={tmp_path}/bus")
        assert caught.value.name in (NO_REPLY, "org.freedesktop.DBus.Error.AuthFailed")
    finally:
        server.close()


async def test_a_property_that_does_not_fit_is_invalid_args() -> None:
    manager = SystemdManager(timeout=1)
    with pytest.raises(SystemdError) as caught:
        await manager.start_transient_unit(
            "x.service", TransientUnit(("/bin/true",), extra=(("Nice", "i", "x"),))
        )
    assert caught.value.name == INVALID_ARGS
