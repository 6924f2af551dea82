from __future__ import annotations

import array
import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from opmasd.logging import JournalRenderer, configure_logging, resolve_format
from opmasd.systemd.journal import encode_journal_fields, journal_fields


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "journal.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def decode(data: bytes) -> list[tuple[str, str]]:
    """journald's side of the native protocol."""
    fields, i = [], 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            i = end + 10 + size
        fields.append((name.decode(), value.decode()))
    return fields


def receive_fields(sock: socket.socket) -> dict[str, str]:
    fields = decode(sock.recv(1 << 20))
    names = [name for name, _ in fields]
    assert len(names) == len(set(names))
    return dict(fields)


# --- journal -------------------------------------------------------------------------------


def test_encoding_simple_and_multiline() -> None:
    data = encode_journal_fields([("MESSAGE", "hello"), ("TRACE", "a\nb")])
    assert data == b"MESSAGE=hello\nTRACE\n" + struct.pack("<Q", 3) + b"a\nb\n"
    assert decode(data) == [("MESSAGE", "hello"), ("TRACE", "a\nb")]


def test_field_names_are_sanitised() -> None:
    fields = dict(
        journal_fields(
            {
                "event": "x",
                "level": "error",
                "agent_id": "a1",
                "_private": 1,
                "9lives": True,
                "ünïcode-key": "v",
                "message": "clash",
                "data": {"k": [1, 2]},
            }
        )
    )
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "opmasd"
    assert fields["AGENT_ID"] == "a1"
    assert fields["PRIVATE"] == "1"
    assert fields["F_9LIVES"] == "True"
    assert fields["N_CODE_KEY"] == "v"
    assert fields["EVENT_MESSAGE"] == "clash"
    assert fields["DATA"] == '{"k": [1, 2]}'
    assert all(name.replace("_", "").isalnum() and name.isupper() for name in fields)


def test_journal_renderer_sends_fields_over_a_real_socket(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    renderer = JournalRenderer(path)
    event = {
        "event": "agent crashed",
        "level": "warning",
        "timestamp": "2025-01-01T00:00:00Z",
        "agent_id": "net-1",
        "exit_code": 3,
        "stderr_tail": "line one\nline two",
    }
    with pytest.raises(structlog.DropEvent):
        renderer(None, "warning", event)
    fields = receive_fields(sock)
    assert fields == {
        "MESSAGE": 'agent crashed agent_id=net-1 exit_code=3 stderr_tail="line one\\nline two"',
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "opmasd",
        "AGENT_ID": "net-1",
        "EXIT_CODE": "3",
        "STDERR_TAIL": "line one\nline two",
    }
    renderer.close()


def test_exception_is_part_of_the_message(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    renderer = JournalRenderer(path)
    with pytest.raises(structlog.DropEvent):
        renderer(None, "error", {"event": "boom", "level": "error", "exception": "Traceback...\nValueError"})
    fields = receive_fields(sock)
    assert fields["MESSAGE"] == "boom\nTraceback...\nValueError"
    assert fields["PRIORITY"] == "3"
    assert "EXCEPTION" not in fields


def test_oversized_entry_goes_as_a_sealed_memfd(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    renderer = JournalRenderer(path)
    huge = "x" * (4 << 20)  # above any datagram size limit
    with pytest.raises(structlog.DropEvent):
        renderer(None, "info", {"event": "big", "level": "info", "blob": huge})
    data, ancillary, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(4))
    assert data == b""
    (level, kind, payload) = ancillary[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", payload[:4])[0]
    with os.fdopen(fd, "rb") as memfd:
        memfd.seek(0)  # the descriptor shares our write offset; journald reads with mmap
        fields = dict(decode(memfd.read()))
    assert fields["BLOB"] == huge
    renderer.close()


def test_journal_unreachable_falls_back_to_stderr_and_says_so_once(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", "journal", stream=stream, journal_socket=str(tmp_path / "absent.sock"))
    log = structlog.get_logger()
    log.info("first", agent_id="a")
    log.info("second")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "cannot log to journald, logging to stderr until it is back",
        "first",
        "second",
    ]
    assert lines[0]["level"] == "warning"
    assert lines[0]["socket"] == str(tmp_path / "absent.sock")
    assert lines[1]["agent_id"] == "a"


def test_configure_journal_end_to_end(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    stream = io.StringIO()
    configure_logging("info", "journal", stream=stream, journal_socket=path)
    structlog.get_logger().info("agent started", agent_id="net-1")
    fields = receive_fields(sock)
    assert fields["MESSAGE"] == "agent started agent_id=net-1"
    assert fields["PRIORITY"] == "6"
    assert fields["AGENT_ID"] == "net-1"
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        structlog.get_logger().exception("failed")
    fields = receive_fields(sock)
    assert fields["MESSAGE"].startswith("failed\nTraceback (most recent call last):")
    assert "ValueError: bad\nthing" in fields["MESSAGE"]
    logging.getLogger("grpc").warning("from %s", "stdlib")
    fields = receive_fields(sock)
    assert fields["MESSAGE"] == "from stdlib logger=grpc"
    assert (fields["PRIORITY"], fields["LOGGER"]) == ("4", "grpc")
    assert stream.getvalue() == ""


# --- json and console ----------------------------------------------------------------------


def test_json_lines_with_timestamp_level_and_exception() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log = structlog.get_logger()
    log.debug("hidden")
    log.info("hello", agent_id="a1")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["hello", "failed"]
    assert lines[0]["level"] == "info"
    assert lines[0]["agent_id"] == "a1"
    assert lines[0]["timestamp"].endswith("Z")
    assert lines[1]["level"] == "error"
    assert "ZeroDivisionError" in lines[1]["exception"]


def test_level_applies_to_existing_loggers_on_reconfigure() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log = structlog.get_logger()
    log.info("one")
    configure_logging("error", "json", stream=stream)
    log.info("two")
    log.error("three")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["one", "three"]


def test_stdlib_logging_warning_and_up_only() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    logging.getLogger("nats").info("chatty")
    logging.getLogger("nats").warning("reconnecting to %s", "x")
    try:
        raise OSError("gone")
    except OSError:
        logging.getLogger("peewee").exception("query failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line["logger"], line["level"]) for line in lines] == [
        ("reconnecting to x", "nats", "warning"),
        ("query failed", "peewee", "error"),
    ]
    assert "OSError: gone" in lines[1]["exception"]
    # Configuring again replaces our handler rather than adding a second one.
    configure_logging("debug", "json", stream=stream)
    assert sum(type(h).__name__ == "_ToStructlog" for h in logging.getLogger().handlers) == 1


def test_console_has_no_colours_off_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    structlog.get_logger().info("hello", agent_id="a1")
    out = stream.getvalue()
    assert "hello" in out
    assert "agent_id=a1" in out
    assert "\x1b[" not in out


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", "json")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


# --- auto ----------------------------------------------------------------------------------


def test_auto_is_journal_when_journal_stream_matches_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        assert resolve_format("auto", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) == "journal"
        assert resolve_format("auto", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) == "json"
        assert resolve_format("auto", stream, {"JOURNAL_STREAM": "garbage"}) == "json"
        assert resolve_format("auto", stream, {}) == "json"
        assert resolve_format("console", stream, {}) == "console"


def test_auto_is_console_on_a_terminal() -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as stream:
            assert resolve_format("auto", stream, {}) == "console"
    finally:
        os.close(leader)
        os.close(follower)


def test_auto_without_a_descriptor_is_json() -> None:
    assert resolve_format("auto", io.StringIO(), {"JOURNAL_STREAM": "1:2"}) == "json"
