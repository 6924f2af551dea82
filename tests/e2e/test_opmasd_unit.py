"""opmasd itself as the shipped unit systemd/opmasd.service, run by a real systemd 252 (issue 12).

The unit file is installed unchanged in the sandbox's /run/systemd/system; one drop-in replaces
ExecStart= only (this checkout's venv instead of /usr/lib/opmas/venv; the same --config path),
another may shorten WatchdogSec= for the watchdog test. /etc/opmas, /var/lib/opmas and
/var/log/opmas (what ConfigurationDirectory=, StateDirectory= and LogsDirectory= name) are tmpfs
of the sandbox's own, so nothing lands in the host's tree; the checkout and its venv are bound
into the sandbox at their own paths when they live under /tmp or /run (a CI clone).
The embedded nats-server (the default) is this venv's; gRPC and REST listen on free ports.
opmasctl runs inside the sandbox, as root, over /run/opmas/opmasd.sock.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_fixtures import booted, until
from systemd_sandbox import SANDBOX_PYTHON, SystemdSandbox

from .harness import free_port

pytestmark = pytest.mark.timeout(240)

CHECKOUT = Path(__file__).resolve().parents[2]
UNIT = CHECKOUT / "systemd" / "opmasd.service"
VENV = Path(sys.prefix)
PRIVATE = (Path("/etc/opmas"), Path("/var/lib/opmas"), Path("/var/log/opmas"))
SOCKET = "/run/opmas/opmasd.sock"
AGENTS_DIR = "/etc/opmas/agents.d"
WATCHDOG_SEC = 3
SOCKET_UNIT = CHECKOUT / "systemd" / "opmasd.socket"
REST_PORT = free_port()


@pytest.fixture(scope="module")
def sd() -> Iterator[SystemdSandbox]:
    with booted(SystemdSandbox(shared=(CHECKOUT, VENV), private=PRIVATE)) as sandbox:
        install(sandbox)
        yield sandbox


def install(sd: SystemdSandbox) -> None:
    """The shipped unit, a drop-in naming this checkout's Python, and the configuration."""
    units = sd.host_path("/run/systemd/system")
    shutil.copyfile(UNIT, units / "opmasd.service")
    (units / "opmasd.service.d").mkdir()
    (units / "opmasd.service.d" / "checkout.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={sys.executable} -m opmasd --config /etc/opmas/opmasd.yaml\n"
    )
    config = {
        "service": {
            "log_level": "debug",
            "monitoring_interval": 0.5,
            "discovery_interval": 3600,
            # Agents are left running at a clean stop, for the next opmasd to adopt.
            "stop_agents_on_shutdown": False,
        },
        "grpc": {"address": f"127.0.0.1:{free_port()}"},
        "rest": {"address": f"127.0.0.1:{REST_PORT}"},
        "agents": {"dirs": [AGENTS_DIR], "backoff_initial": 0.1, "backoff_max": 0.5, "stop_timeout": 5},
    }
    # What the package's tmpfiles.d entry makes (/etc/opmas/agents.d: a tmpfs of the sandbox's).
    sd.run("systemd-tmpfiles", "--create", str(UNIT.parent / "opmas.tmpfiles"))
    sd.host_path("/etc/opmas/opmasd.yaml").write_text(json.dumps(config))  # JSON is YAML
    sd.run("systemctl", "daemon-reload")


@pytest.fixture
def opmasd(sd: SystemdSandbox) -> Iterator[SystemdSandbox]:
    """opmasd started (returns once READY=1); stopped, its agents deleted, its drop-ins removed after."""
    sd.run("systemctl", "reset-failed", "opmasd", check=False)
    start(sd)
    yield sd
    if show(sd, "ActiveState")["ActiveState"] != "active":
        start(sd)
    listed = json.loads(ctl(sd, "-o", "json", "agents", "list").stdout or "{}")
    for agent in listed.get("agents", []):
        ctl(sd, "agents", "delete", agent["agentId"])
    sd.run("systemctl", "stop", "opmasd", check=False, timeout=120)
    extra = sd.host_path("/run/systemd/system/opmasd.service.d/test.conf")
    if extra.exists():
        extra.unlink()
        sd.run("systemctl", "daemon-reload")
    for package in sd.host_path(AGENTS_DIR).iterdir():
        shutil.rmtree(package)


def start(sd: SystemdSandbox) -> None:
    result = sd.run("systemctl", "start", "opmasd", check=False, timeout=60)
    assert result.returncode == 0, result.stderr + journal(sd)


def ctl(sd: SystemdSandbox, *args: str, timeout: float = 30.0) -> Any:
    """opmasctl inside the sandbox, as root, over the unit's unix socket (no token)."""
    argv = [sys.executable, "-m", "opmasctl", "--server", SOCKET, *args]
    return sd.run(*argv, check=False, timeout=timeout)


def show(sd: SystemdSandbox, *props: str, unit: str = "opmasd.service") -> dict[str, str]:
    out = sd.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(sd: SystemdSandbox, unit: str = "opmasd.service", lines: int = 80) -> str:
    out = sd.run("journalctl", "-u", unit, "-n", str(lines), "--no-pager", check=False).stdout
    return f"\n--- journal of {unit} ---\n{out}"


def agent(sd: SystemdSandbox, agent_id: str) -> dict[str, Any]:
    result = ctl(sd, "-o", "json", "agents", "get", agent_id)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def running(sd: SystemdSandbox, agent_id: str) -> dict[str, Any] | None:
    found = agent(sd, agent_id)
    return found if found["status"]["state"] == "AGENT_STATE_RUNNING" else None


def test_start_returns_once_ready_and_status_shows_the_counts(opmasd: SystemdSandbox) -> None:
    # `systemctl start` has returned (the fixture): Type=notify means READY=1 was sent, so the
    # socket answers now, with no retry.
    listed = ctl(opmasd, "agents", "list")
    assert listed.returncode == 0, listed.stderr + journal(opmasd)
    shown = show(opmasd, "ActiveState", "SubState", "Type", "StatusText", "MainPID", "NotifyAccess")
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running", shown
    assert shown["Type"] == "notify" and shown["NotifyAccess"] == "main", shown
    assert shown["StatusText"] == "0 agents, 0 running", shown
    status = opmasd.run("systemctl", "status", "--no-pager", "opmasd", check=False).stdout
    assert 'Status: "0 agents, 0 running"' in status, status
    # The directories systemd made and handed over, used as opmasd's defaults.
    for path in ("/var/lib/opmas/opmas.db", SOCKET):
        assert opmasd.host_path(path).exists(), path
    # Its log went to the journal through the native protocol: the event's keys are fields.
    out = opmasd.run("journalctl", "-u", "opmasd", "-o", "json", "--no-pager", check=False).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    ready = [e for e in entries if str(e.get("MESSAGE", "")).startswith("opmasd ready")]
    assert ready and ready[-1].get("AGENTS") == "0", journal(opmasd)


def test_reload_rescans_the_agents_directories(opmasd: SystemdSandbox) -> None:
    package = opmasd.host_path(f"{AGENTS_DIR}/dropped")
    package.mkdir()
    (package / "agent.yaml").write_text("name: dropped-in\nentrypoint: /bin/sleep 1000\nautostart: false\n")
    assert "dropped-in" not in ctl(opmasd, "agents", "list").stdout  # discovery_interval: 1 h
    before = show(opmasd, "MainPID")["MainPID"]
    result = opmasd.run("systemctl", "reload", "opmasd", check=False)
    assert result.returncode == 0, result.stderr + journal(opmasd)
    until(
        lambda: "dropped-in" in ctl(opmasd, "agents", "list").stdout,
        15,
        "the rescan to list it" + journal(opmasd),
    )
    shown = show(opmasd, "MainPID", "ActiveState", "StatusText")
    assert shown["MainPID"] == before and shown["ActiveState"] == "active", shown  # no restart
    until(lambda: show(opmasd, "StatusText")["StatusText"] == "1 agents, 0 running", 10, "STATUS=")
    assert "configuration reloaded" in journal(opmasd)


def test_a_reload_with_a_broken_configuration_says_so_in_the_status(opmasd: SystemdSandbox) -> None:
    # `systemctl reload` cannot fail (ExecReload= is a kill): the STATUS text tells instead.
    config_file = opmasd.host_path("/etc/opmas/opmasd.yaml")
    saved = config_file.read_text()
    config_file.write_text("service: {log_level: loud}\n")
    try:
        opmasd.run("systemctl", "reload", "opmasd")
        status = until(lambda: "reload failed" in (t := show(opmasd, "StatusText")["StatusText"]) and t, 10)
        assert "service.log_level" in status and show(opmasd, "ActiveState")["ActiveState"] == "active"
    finally:
        config_file.write_text(saved)
    opmasd.run("systemctl", "reload", "opmasd")
    until(lambda: "reload failed" not in show(opmasd, "StatusText")["StatusText"], 10, "a good reload")


def test_a_hung_event_loop_is_killed_by_the_watchdog_and_restarted(opmasd: SystemdSandbox) -> None:
    dropin = opmasd.host_path("/run/systemd/system/opmasd.service.d/test.conf")
    dropin.write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}\nEnvironment=OPMAS_DEBUG_HANG_SIGNAL=1\n")
    opmasd.run("systemctl", "daemon-reload")
    opmasd.run("systemctl", "restart", "opmasd", timeout=120)
    before = show(opmasd, "MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == f"{WATCHDOG_SEC}s", before
    time.sleep(WATCHDOG_SEC * 1.5)  # it pings on time while its loop runs: no kill
    assert show(opmasd, "MainPID")["MainPID"] == before["MainPID"], journal(opmasd)
    hung_at = time.monotonic()
    opmasd.run("kill", "-USR2", before["MainPID"])

    def restarted() -> dict[str, str] | None:
        now = show(opmasd, "MainPID", "NRestarts", "ActiveState", "Result")
        moved = now["MainPID"] not in ("0", before["MainPID"]) and now["ActiveState"] == "active"
        return now if moved else None

    after = until(restarted, 30, "systemd to kill and restart the hung opmasd")
    # Killed within WatchdogSec of the last ping (plus RestartSec=2 and a start).
    assert time.monotonic() - hung_at < WATCHDOG_SEC + 2 + 10, after
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, after
    log = journal(opmasd, lines=200)
    assert "Watchdog timeout" in log and "Failed with result 'watchdog'" in log, log
    assert ctl(opmasd, "agents", "list").returncode == 0


def register(sd: SystemdSandbox, name: str, *flags: str) -> None:
    script = 'echo "hello from $AGENT_ID"; echo "trouble" >&2; exec sleep 1000'
    result = ctl(sd, "agents", "register", "--name", name, *flags, "--start", "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr + journal(sd)
    until(lambda: running(sd, name), 20, f"{name} running")


def unit_of(agent_id: str) -> str:
    return "opmas-agent-" + agent_id.replace("-", "\\x2d") + ".service"


@pytest.mark.parametrize("how", ["restart", "stop-start"])
def test_systemd_runtime_agents_survive_opmasd_and_are_adopted(opmasd: SystemdSandbox, how: str) -> None:
    register(opmasd, "kept", "--runtime", "systemd")
    pid = agent(opmasd, "kept")["status"]["pid"]
    main = show(opmasd, "MainPID", unit=unit_of("kept"))["MainPID"]
    assert str(pid) == main
    runtime_dir = opmasd.host_path("/run/opmas")
    marker = runtime_dir / "kept-across-restarts"
    marker.touch()
    if how == "restart":
        opmasd.run("systemctl", "restart", "opmasd", timeout=120)
        assert marker.exists()  # RuntimeDirectoryPreserve=restart
    else:
        opmasd.run("systemctl", "stop", "opmasd", timeout=120)
        assert not runtime_dir.exists()  # a stop is not a restart: the runtime directory goes
        assert show(opmasd, "ActiveState", unit=unit_of("kept"))["ActiveState"] == "active"
        opmasd.run("systemctl", "start", "opmasd", timeout=120)
    adopted = until(lambda: running(opmasd, "kept"), 20, "kept adopted")
    assert adopted["status"]["pid"] == pid, adopted
    assert show(opmasd, "MainPID", unit=unit_of("kept"))["MainPID"] == main


@pytest.mark.parametrize("how", ["restart", "stop-start"])
def test_process_runtime_agents_survive_opmasd_and_are_adopted(opmasd: SystemdSandbox, how: str) -> None:
    ticker = "n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.2; done"
    result = ctl(opmasd, "agents", "register", "--name", "proc-kept", "--runtime", "process", "--start", "--",
                 "/bin/sh", "-c", ticker)  # fmt: skip
    assert result.returncode == 0, result.stderr
    pid = until(lambda: running(opmasd, "proc-kept"), 20, "proc-kept running")["status"]["pid"]
    if how == "restart":
        opmasd.run("systemctl", "restart", "opmasd", timeout=120)
    else:
        opmasd.run("systemctl", "stop", "opmasd", timeout=120)
        opmasd.run("systemctl", "start", "opmasd", timeout=120)
    adopted = until(lambda: running(opmasd, "proc-kept"), 20, "proc-kept adopted")
    assert adopted["status"]["pid"] == pid, str(adopted) + journal(opmasd)

    def ticks() -> list[int]:
        out = ctl(opmasd, "agents", "logs", "proc-kept", "--tail", "5").stdout
        return [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "tick " in line]

    # It goes on writing, and its output still reaches its log: the log relay outlived opmasd too.
    first = max(ticks() or [0])
    until(lambda: max(ticks() or [0]) > first + 2, 10, "new ticks in the log")


def test_with_the_default_config_a_restart_keeps_agents_and_a_stop_stops_them(opmasd: SystemdSandbox) -> None:
    # service.stop_agents_on_shutdown is true by default: `systemctl stop` stops the agents, but
    # a restart (systemctl restart, a package upgrade's try-restart) is no stop of the agents:
    # opmasd asks systemd whether its unit's job is a restart, and keeps them up.
    config_file = opmasd.host_path("/etc/opmas/opmasd.yaml")
    saved = config_file.read_text()
    config = json.loads(saved)
    del config["service"]["stop_agents_on_shutdown"]
    config_file.write_text(json.dumps(config))
    try:
        opmasd.run("systemctl", "restart", "opmasd", timeout=120)  # the default is now in force
        register(opmasd, "unit-kept", "--runtime", "systemd")
        register(opmasd, "proc-kept2", "--runtime", "process")
        pids = {a: agent(opmasd, a)["status"]["pid"] for a in ("unit-kept", "proc-kept2")}
        for how in ("restart", "try-restart"):
            opmasd.run("systemctl", how, "opmasd", timeout=120)
            for agent_id, pid in pids.items():
                adopted = until(lambda a=agent_id: running(opmasd, a), 20, f"{agent_id} after {how}")
                assert adopted["status"]["pid"] == pid, str(adopted) + journal(opmasd)
        assert "agents keep running for the next opmasd" in journal(opmasd, lines=400)
        opmasd.run("systemctl", "stop", "opmasd", timeout=120)
        for pid in pids.values():
            assert not opmasd.host_path(f"/proc/{pid}").exists(), f"agent {pid} outlived `systemctl stop`"
        assert show(opmasd, "ActiveState", unit=unit_of("unit-kept"))["ActiveState"] != "active"
    finally:
        config_file.write_text(saved)


def proc_status(sd: SystemdSandbox, pid: int | str) -> dict[str, str]:
    text = sd.host_path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


# linux/capability.h numbers of the capabilities the unit may name.
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_KILL": 5,
        "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13,
        "CAP_SYS_RESOURCE": 24}  # fmt: skip


def bounding_set() -> int:
    """The CapabilityBoundingSet= of the shipped unit, as /proc/PID/status's CapBnd mask, within
    this host's own (the sandbox cannot have more: one CI host here lacks CAP_SYS_RESOURCE)."""
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("CapabilityBoundingSet="))
    ours = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("CapBnd:"))
    return sum(1 << CAPS[name] for name in line.split("=", 1)[1].split()) & int(ours.split()[1], 16)


@pytest.mark.parametrize("runtime", ["systemd", "process"])
def test_an_agent_with_user_nobody_runs_as_nobody(opmasd: SystemdSandbox, runtime: str) -> None:
    name = f"as-nobody-{runtime}"
    register(opmasd, name, "--runtime", runtime, "--user", "nobody")
    pid = agent(opmasd, name)["status"]["pid"]
    daemon, agent_status = proc_status(opmasd, show(opmasd, "MainPID")["MainPID"]), proc_status(opmasd, pid)
    assert agent_status["Uid"].split()[0] == opmasd.run("id", "-u", "nobody").stdout.strip()
    # opmasd: root, held by the unit's bounding set, no_new_privs, a seccomp filter.
    assert daemon["Uid"].split()[0] == "0"
    assert int(daemon["CapBnd"], 16) == bounding_set(), daemon["CapBnd"]
    assert daemon["NoNewPrivs"] == "1" and daemon["Seccomp"] == "2", daemon
    if runtime == "process":  # opmasd's child: its sandbox reaches the agent, as the unit says
        assert int(agent_status["CapBnd"], 16) == bounding_set()
        assert agent_status["NoNewPrivs"] == "1" and agent_status["Seccomp"] == "2", agent_status
    else:  # a unit of its own: its own sandbox's bounding set (no capability named: none)
        assert int(agent_status["CapBnd"], 16) == 0, agent_status["CapBnd"]


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_under_the_unit_a_process_agent_keeps_only_the_capabilities_it_names(
    opmasd: SystemdSandbox, user: str
) -> None:
    # setpriv drops the rest of the bounding set only with CAP_SETPCAP, which the unit must hold:
    # without it the agent silently kept every capability of opmasd's.
    name = f"raw-{user}"
    register(opmasd, name, "--runtime", "process", "--user", user, "--capability", "net_raw")
    status = proc_status(opmasd, agent(opmasd, name)["status"]["pid"])
    assert int(status["CapBnd"], 16) == 1 << CAPS["CAP_NET_RAW"], status["CapBnd"]
    assert int(status["CapEff"], 16) == 1 << CAPS["CAP_NET_RAW"], status["CapEff"]
    beyond = ctl(opmasd, "agents", "register", "--name", "admin", "--runtime", "process",
                 "--capability", "sys_admin", "--", "/bin/sleep", "100")  # fmt: skip
    assert beyond.returncode != 0 and "CAP_SYS_ADMIN not in opmasd's own bounding set" in beyond.stderr


def test_a_systemd_runtime_agent_cannot_read_opmasd_s_secrets(opmasd: SystemdSandbox) -> None:
    # Agent units run as root by default: without hiding them, an agent read every other
    # agent's NATS password in /run/opmas/systemd-env and the store in /var/lib/opmas.
    register(opmasd, "victim", "--runtime", "systemd", "--env", "SECRET=hunter2-victim")
    probe = "cat /run/opmas/systemd-env/* /etc/opmas/opmasd.yaml; ls -A /var/lib/opmas /var/log/opmas; "
    probe += "exec sleep 1000"
    result = ctl(opmasd, "agents", "register", "--name", "snoop", "--runtime", "systemd", "--start", "--",
                 "/bin/sh", "-c", probe)  # fmt: skip
    assert result.returncode == 0, result.stderr
    until(lambda: running(opmasd, "snoop"), 20, "snoop running")
    out = until(lambda: ctl(opmasd, "agents", "logs", "snoop").stdout, 10, "snoop's output")
    assert "hunter2" not in out and "NATS_PASSWORD" not in out and "opmas.db" not in out, out
    assert "grpc" not in out, out  # nothing of the configuration either


def test_logs_of_a_systemd_runtime_agent_come_from_the_journal(opmasd: SystemdSandbox) -> None:
    register(opmasd, "talker", "--runtime", "systemd")

    def streams() -> dict[str, str]:
        out = ctl(opmasd, "-o", "json", "agents", "logs", "talker").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        found = {e.get("line"): e.get("stream") for e in entries}
        return found if {"hello from talker", "trouble"} <= set(found) else {}

    found = until(streams, 20, "both lines in the journal")
    assert found["hello from talker"] == "LOG_STREAM_STDOUT", found
    assert found["trouble"] == "LOG_STREAM_STDERR", found


def test_the_shipped_units_verify_inside_systemd(sd: SystemdSandbox) -> None:
    # With the drop-in, so that ExecStart's program exists; every other line is the shipped one's.
    result = sd.run("systemd-analyze", "verify", "opmasd.service", check=False)
    assert result.returncode == 0 and "opmasd" not in result.stderr, result.stderr
    for other in sorted(UNIT.parent.glob("*.socket")):  # beside the service they name
        result = sd.run("systemd-analyze", "verify", str(other), check=False)
        assert result.returncode == 0 and "opmasd" not in result.stderr, result.stderr


def test_an_agent_over_its_memory_limit_is_reported_with_opmasd_inside(opmasd: SystemdSandbox) -> None:
    # On cgroup v1 this needs opmasd to write the unit's cgroup.event_control: why the unit has
    # no ProtectControlGroups=.
    hog = "b = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(1000)"
    result = ctl(
        opmasd, "agents", "register", "--name", "hog", "--runtime", "systemd", "--memory-max", "32M",
        "--restart-policy", "never", "--", SANDBOX_PYTHON, "-c", hog,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    started = ctl(opmasd, "agents", "start", "hog")
    assert started.returncode != 0
    assert "killed by SIGKILL: out of memory (MemoryMax)" in started.stderr, started.stderr + journal(opmasd)


def test_the_sandbox_binds_shared_paths_and_keeps_private_ones(tmp_path: Path) -> None:
    """The options this module's sandbox relies on: a path under /tmp (a CI clone) is seen inside
    at the same path; a private path is a tmpfs inside, and its host mountpoint goes with it."""
    (tmp_path / "probe").write_text("from the host")
    private = Path("/var/lib/opmas-sdtest-probe")
    assert not private.exists()
    with booted(SystemdSandbox(shared=(tmp_path,), private=(private,))) as sandbox:
        assert sandbox.run("cat", str(tmp_path / "probe")).stdout == "from the host"
        sandbox.run("touch", str(private / "inside"))
        assert sandbox.run("stat", "-f", "-c", "%T", str(private)).stdout.strip() == "tmpfs"
        assert private.is_dir() and not any(private.iterdir())  # the host's: empty
    assert not private.exists()


def healthz() -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{REST_PORT}/healthz", timeout=30) as reply:
        return int(reply.status)


def test_socket_activation_starts_opmasd_and_keeps_the_rest_port(opmasd: SystemdSandbox) -> None:
    units = opmasd.host_path("/run/systemd/system")
    shutil.copyfile(SOCKET_UNIT, units / "opmasd.socket")
    # Its address only (the test's free port, as rest.address says): every other line is shipped.
    (units / "opmasd.socket.d").mkdir(exist_ok=True)
    (units / "opmasd.socket.d" / "port.conf").write_text(
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{REST_PORT}\n"
    )
    opmasd.run("systemctl", "stop", "opmasd", timeout=120)
    opmasd.run("systemctl", "daemon-reload")
    try:
        opmasd.run("systemctl", "start", "opmasd.socket")
        assert show(opmasd, "ActiveState")["ActiveState"] == "inactive"
        assert healthz() == 200  # the first connection starts opmasd, which answers it
        shown = show(opmasd, "ActiveState", "TriggeredBy")
        assert shown["ActiveState"] == "active" and "opmasd.socket" in shown["TriggeredBy"], shown
        assert "REST adopts the socket systemd passed" in journal(opmasd)  # did not bind its own
        # The port stays open across a restart: a connection made meanwhile waits and is served.
        opmasd.run("systemctl", "restart", "--no-block", "opmasd")
        with socket.create_connection(("127.0.0.1", REST_PORT), timeout=5):
            pass
        assert healthz() == 200
    finally:
        opmasd.run("systemctl", "stop", "opmasd.socket", check=False)
        (units / "opmasd.socket").unlink()
        shutil.rmtree(units / "opmasd.socket.d")
        opmasd.run("systemctl", "daemon-reload")
