from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from opmasd.systemd.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_are_the_exact_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    notifier.ready()
    assert receive(sock) == "READY=1"
    notifier.ready("12 agents, 11 running")
    assert receive(sock) == "READY=1\nSTATUS=12 agents, 11 running"
    notifier.status("rescanning\nagents")
    assert receive(sock) == "STATUS=rescanning agents"
    notifier.status("état: prêt")  # UTF-8, which sdnotify's latin-1 would mangle or drop
    assert receive(sock) == "STATUS=état: prêt"
    notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert receive(sock) == "STOPPING=1"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = receive(sock).split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
    notifier.close()


def test_abstract_socket() -> None:
    name = f"opmas-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receive(sock) == "READY=1"
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.reloading()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    assert notifier._sock is None  # not even a socket was made
    assert notifier.watchdog_interval() is None


def test_reads_the_process_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().stopping()
    assert receive(sock) == "STOPPING=1"


def test_failure_is_logged_once_per_outage(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    with structlog.testing.capture_logs() as logs:
        notifier.watchdog()
        notifier.watchdog()  # still failing: not logged again
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [("sd_notify failed", "warning")]
    assert logs[0]["socket"] == str(path)
    assert logs[0]["notification"] == "WATCHDOG=1"

    # The socket appears (systemd was slow): sends work, the recovery is said, later failures count anew.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        with structlog.testing.capture_logs() as logs:
            notifier.watchdog()
        assert receive(sock) == "WATCHDOG=1"
        assert [entry["event"] for entry in logs] == ["sd_notify works again"]
    finally:
        sock.close()
    path.unlink()
    with structlog.testing.capture_logs() as logs:
        notifier.watchdog()
    assert [entry["event"] for entry in logs] == ["sd_notify failed"]


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent", **env}).watchdog_interval() == interval
