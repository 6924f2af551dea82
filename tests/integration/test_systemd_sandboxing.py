"""Capabilities and sandboxing take effect in a real systemd 252 (tests/systemd_sandbox.py):
systemctl show has the properties, and the agent meets them.

- No capability named: an empty bounding set, so even a root agent cannot open a raw socket.
- `nobody` with CAP_NET_RAW opens a raw ICMP socket (AmbientCapabilities); without it, EPERM.
- The defaults: /usr and /etc read-only (ProtectSystem=full), a /tmp of its own (PrivateTmp).
- protect_system: strict leaves the working directory writable and the rest read-only.

The agents are Python scripts under /var/tmp that report in JSON files there (with PrivateTmp
off: it would hide /var/tmp) or, for PrivateTmp itself, are looked at through /proc/PID/root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_sandbox import SANDBOX_PYTHON, SystemdSandbox

from opmasd.core.model import ExitInfo, ProcessHandle
from opmasd.core.privileges import Sandbox
from opmasd.runtime.base import LaunchRequest
from opmasd.runtime.systemd import JournalSource, SystemdRuntime
from opmasd.runtime.systemd_units import escape_unit_name

WAIT = 15.0
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
SHARED_TMP = Sandbox(private_tmp=False)

# Reports what the agent may do: a raw ICMP socket, writes to some paths, its capability sets.
PROBE = """
import json, os, socket, sys, time
out = {}
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    out["raw"] = "ok"
except OSError as exc:
    out["raw"] = exc.errno
for path in sys.argv[2:]:
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
        out[path] = "ok"
    except OSError as exc:
        out[path] = exc.errno
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
for key in ("Uid", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
    out[key] = status[key].split()[0]
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(out, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(1000)
"""
NET_RAW = f"{1 << 13:016x}"  # CAP_NET_RAW's bit, as /proc/PID/status shows a set


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="opmas-sdsb-", dir="/var/tmp"))
    path.chmod(0o777)  # agents as nobody write their reports here
    (path / "probe.py").write_text(textwrap.dedent(PROBE))
    (path / "probe.py").chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def runtime(systemd_sandbox: SystemdSandbox) -> AsyncIterator[SystemdRuntime]:
    journal = JournalSource(directory=systemd_sandbox.host_path("/run/log/journal"))
    rt = SystemdRuntime(systemd_sandbox.bus_address, journal, root=systemd_sandbox.host_path("/"))

    def ignore_exit(agent_id: str, handle: ProcessHandle, info: ExitInfo) -> None:
        """Exits are not what these tests look at."""

    rt.set_exit_handler(ignore_exit)
    await rt.connect()
    try:
        yield rt
    finally:
        for agent_id in list(rt._watched):
            with contextlib.suppress(Exception):
                await rt.terminate(agent_id, 0.5)
        await rt.aclose()


async def probe(
    rt: SystemdRuntime, work: Path, *paths: str, workdir: str = "", **fields: Any
) -> tuple[str, ProcessHandle, dict[str, Any]]:
    """(unit, handle, report) of a probe agent launched with the request's `fields`."""
    agent_id = f"sb-{uuid.uuid4().hex[:6]}"
    report = work / f"{agent_id}.json"
    argv = (SANDBOX_PYTHON, str(work / "probe.py"), str(report), *paths)
    handle = await rt.launch(LaunchRequest(agent_id, argv, workdir, ENV, **fields))
    async with asyncio.timeout(WAIT):
        while not report.exists():
            await asyncio.sleep(0.02)
    return escape_unit_name(agent_id), handle, json.loads(report.read_text())


def show(sd: SystemdSandbox, unit: str, *props: str) -> dict[str, str]:
    out = sd.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def test_a_root_agent_without_capabilities_has_none(
    runtime: SystemdRuntime, work: Path, systemd_sandbox: SystemdSandbox
) -> None:
    unit, _, seen = await probe(runtime, work, "/usr/opmas-probe", "/etc/opmas-probe", sandbox=SHARED_TMP)
    assert seen["Uid"] == "0" and seen["CapEff"] == seen["CapBnd"] == "0" * 16, seen
    assert seen["raw"] == 1  # EPERM: root, and still no raw socket
    assert seen["/usr/opmas-probe"] == seen["/etc/opmas-probe"] == 30, seen  # EROFS (full)
    assert seen["NoNewPrivs"] == "1"
    shown = show(
        systemd_sandbox, unit, "CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges",
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectControlGroups",
    )  # fmt: skip
    assert shown == {
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "full",
        "ProtectHome": "read-only",
        "PrivateTmp": "no",  # this test's own choice: the report is under /var/tmp
        "PrivateDevices": "no",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
    }, shown


async def test_nobody_with_cap_net_raw_opens_a_raw_socket_and_without_it_cannot(
    runtime: SystemdRuntime, work: Path, systemd_sandbox: SystemdSandbox
) -> None:
    unit, _, seen = await probe(
        runtime, work, user="nobody", capabilities=("CAP_NET_RAW",), sandbox=SHARED_TMP
    )
    assert seen["raw"] == "ok", seen
    assert seen["Uid"] != "0" and seen["CapEff"] == seen["CapBnd"] == seen["CapAmb"] == NET_RAW, seen
    shown = show(systemd_sandbox, unit, "CapabilityBoundingSet", "AmbientCapabilities", "User")
    assert shown == {
        "CapabilityBoundingSet": "cap_net_raw",
        "AmbientCapabilities": "cap_net_raw",
        "User": "nobody",
    }, shown
    _, _, without = await probe(runtime, work, user="nobody", sandbox=SHARED_TMP)
    assert without["raw"] == 1 and without["CapEff"] == "0" * 16, without


async def test_the_agent_has_a_tmp_of_its_own(
    runtime: SystemdRuntime, work: Path, systemd_sandbox: SystemdSandbox
) -> None:
    # The report goes where PrivateTmp does not reach: the working directory, outside /var/tmp.
    own = Path(tempfile.mkdtemp(prefix="opmas-sdsb-", dir="/var/lib"))
    try:
        agent_id = f"tmp-{uuid.uuid4().hex[:6]}"
        script = (
            "import time; open('/tmp/mine', 'w').write('x'); open('done', 'w').write('x'); time.sleep(1000)"
        )
        handle = await runtime.launch(LaunchRequest(agent_id, (SANDBOX_PYTHON, "-c", script), str(own), ENV))
        async with asyncio.timeout(WAIT):
            while not (own / "done").exists():
                await asyncio.sleep(0.02)
        assert show(systemd_sandbox, escape_unit_name(agent_id), "PrivateTmp")["PrivateTmp"] == "yes"
        # Its /tmp (seen through its own mount namespace) has the file; systemd's /tmp has not.
        assert systemd_sandbox.host_path(f"/proc/{handle.pid}/root/tmp/mine").exists()
        assert not systemd_sandbox.host_path("/tmp/mine").exists()
    finally:
        shutil.rmtree(own, ignore_errors=True)


async def test_strict_leaves_only_the_working_directory_writable(
    runtime: SystemdRuntime, work: Path, systemd_sandbox: SystemdSandbox
) -> None:
    outside = f"/var/lib/opmas-probe-{uuid.uuid4().hex[:6]}"
    strict = Sandbox(private_tmp=False, protect_system="strict")
    unit, _, seen = await probe(runtime, work, f"{work}/mine", outside, workdir=str(work), sandbox=strict)
    assert seen[f"{work}/mine"] == "ok" and seen[outside] == 30, seen  # EROFS outside
    shown = show(systemd_sandbox, unit, "ProtectSystem", "ReadWritePaths")
    assert shown == {"ProtectSystem": "strict", "ReadWritePaths": f"-{work}"}, shown
