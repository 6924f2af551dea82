"""`opmasctl audit` against an in-process AuditService that pages and filters a canned trail.

The fake records every request and the token it came with, so each test checks what the CLI
sent (filters, page sizes, page tokens) and what it printed; `--agent` completion is run the
way the shell asks, against a fake AgentService on the same server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2, timestamp_pb2

from opmas.v1 import agents_pb2, agents_pb2_grpc, audit_pb2, audit_pb2_grpc
from opmasctl import completion
from opmasctl.audit import TIMES, Pager, audit_table, visible
from opmasctl.cli import build_parser, run
from opmasctl.output import clock_text, dump, message_to_dict
from opmasctl.tables import TableStyle

ADMIN = "opmas_ffffffffffffffff_AdminTokenSecret"
Handler = Callable[[Any, grpc.ServicerContext], Any]
NOW = datetime.now(UTC)


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(when)
    return result


def struct(**fields: Any) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(fields)
    return result


# Newest first, as the daemon lists them.
TRAIL = [
    audit_pb2.AuditRecord(
        id=3,
        time=stamp(NOW - timedelta(minutes=2)),
        actor="token:00000000000000aa",
        peer="ipv4:10.0.0.5:51234",
        entry_point="rest",
        operation="StopAgent",
        target="web-1",
        parameters=struct(agent_id="web-1", timeout="5s"),
        result="OK",
        node="n1",
        count=1,
    ),
    audit_pb2.AuditRecord(
        id=2,
        time=stamp(NOW - timedelta(hours=5)),
        actor="anonymous",
        peer="ipv4:203.0.113.9",
        entry_point="grpc",
        operation="DeleteAgent",
        result="UNAUTHENTICATED",
        message="missing or invalid credentials",
        node="n1",
        count=7,
    ),
    audit_pb2.AuditRecord(
        id=1,
        time=stamp(NOW - timedelta(days=3)),
        actor="local",
        peer="unix:",
        entry_point="grpc",
        operation="CreateAgent",
        target="web-1",
        parameters=struct(agent_id="web-1", spec={"name": "web", "replicas": 2}),
        result="INVALID_ARGUMENT",
        message="spec.command: must not be empty",
        node="n2",
        count=1,
    ),
]


def many(count: int) -> list[audit_pb2.AuditRecord]:
    """A trail of `count` records, newest (highest id) first, a second apart."""
    return [
        audit_pb2.AuditRecord(
            id=i,
            time=stamp(NOW - timedelta(seconds=count - i)),
            actor="local",
            peer="unix:",
            entry_point="grpc",
            operation="StartAgent",
            target=f"a{i % 7}",
            result="OK",
            count=1,
        )
        for i in range(count, 0, -1)
    ]


class FakeAudit(audit_pb2_grpc.AuditServiceServicer, agents_pb2_grpc.AgentServiceServicer):
    """ListAuditRecords over `trail` as the daemon answers it: filtered, newest first, a page of
    page_size (0: 100; at most `largest_page`), the next page_token the last record's id. Also
    ListAgents, for --agent completion."""

    def __init__(self) -> None:
        self.trail = list(TRAIL)
        self.largest_page = 1000
        self.requests: list[audit_pb2.ListAuditRecordsRequest] = []
        self.metadata: list[str | None] = []
        self.handler: Handler | None = None

    def ListAuditRecords(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()).get("authorization"))
        if self.handler is not None:
            return self.handler(request, context)
        matching = [
            record
            for record in self.trail
            if (not request.agent_id or record.target == request.agent_id)
            and (not request.actor or record.actor == request.actor)
            and (
                not request.HasField("since") or record.time.ToNanoseconds() >= request.since.ToNanoseconds()
            )
            and (not request.page_token or record.id < int(request.page_token))
        ]
        size = min(request.page_size or 100, self.largest_page)
        page = matching[:size]
        token = str(page[-1].id) if len(matching) > size else ""
        return audit_pb2.ListAuditRecordsResponse(records=page, next_page_token=token)

    def ListAgents(self, request, context):  # type: ignore[no-untyped-def]
        ids = ["web-1", "web-2", "db"]
        return agents_pb2.ListAgentsResponse(agents=[agents_pb2.Agent(agent_id=i) for i in ids])


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPMAS_TOKEN", "OPMAS_SERVER", "OPMAS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture
def service() -> Iterator[FakeAudit]:
    fake = FakeAudit()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    audit_pb2_grpc.add_AuditServiceServicer_to_server(fake, server)
    agents_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        server.stop(None)


def cli(service: FakeAudit, *argv: str) -> int:
    return run(["--server", service.address, "--token", ADMIN, *argv])  # type: ignore[attr-defined]


def sizes_and_tokens(service: FakeAudit) -> list[tuple[int, str]]:
    return [(request.page_size, request.page_token) for request in service.requests]


# --- what is asked ------------------------------------------------------------------------


def test_the_filters_are_sent(service: FakeAudit) -> None:
    argv = ["--agent", "web-1", "--actor", "local", "--since", "30m", "--limit", "20"]
    assert cli(service, "audit", *argv) == 0
    (request,) = service.requests
    assert (request.agent_id, request.actor, request.page_size) == ("web-1", "local", 20)
    assert request.page_token == ""
    ago = datetime.now(UTC) - request.since.ToDatetime(tzinfo=UTC)
    assert timedelta(minutes=30) <= ago < timedelta(minutes=30, seconds=10)
    assert service.metadata == [f"Bearer {ADMIN}"]


def test_no_filters_by_default_and_the_newest_50(service: FakeAudit) -> None:
    assert cli(service, "audit") == 0
    (request,) = service.requests
    assert (request.agent_id, request.actor, request.page_size) == ("", "", 50)
    assert not request.HasField("since")


@pytest.mark.parametrize(
    ("since", "expected"),
    [("2h", timedelta(hours=2)), ("1d", timedelta(days=1)), ("90s", timedelta(seconds=90))],
)
def test_since_durations(since: str, expected: timedelta, service: FakeAudit) -> None:
    assert cli(service, "audit", "--since", since) == 0
    ago = datetime.now(UTC) - service.requests[0].since.ToDatetime(tzinfo=UTC)
    assert expected <= ago < expected + timedelta(seconds=10)


def test_since_a_time(service: FakeAudit) -> None:
    assert cli(service, "audit", "--since", "2026-01-31T12:00:00+01:00") == 0
    assert service.requests[0].since.ToJsonString() == "2026-01-31T11:00:00Z"


def test_paging_follows_the_token_until_the_limit(
    service: FakeAudit, capsys: pytest.CaptureFixture[str]
) -> None:
    service.trail = many(2500)
    assert cli(service, "-o", "name", "audit", "--limit", "1500") == 0
    assert sizes_and_tokens(service) == [(1000, ""), (500, "1501")]
    assert capsys.readouterr().out.split() == [str(i) for i in range(2500, 1000, -1)]


def test_all_reads_every_page(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    service.trail = many(2500)
    assert cli(service, "-o", "name", "audit", "--all") == 0
    assert sizes_and_tokens(service) == [(1000, ""), (1000, "1501"), (1000, "501")]
    out, err = capsys.readouterr()
    assert out.split() == [str(i) for i in range(2500, 0, -1)] and err == ""


def test_the_last_page_ends_it_before_the_limit(
    service: FakeAudit, capsys: pytest.CaptureFixture[str]
) -> None:
    service.largest_page = 2  # a server may give less than asked: the token says there is more
    assert cli(service, "-o", "name", "audit", "--limit", "100") == 0
    assert sizes_and_tokens(service) == [(100, ""), (98, "2")]
    assert capsys.readouterr().out == "3\n2\n1\n"


def test_a_server_giving_more_than_asked_is_cut_at_the_limit() -> None:
    class Greedy:
        def __init__(self) -> None:
            self.calls = 0

        def ListAuditRecords(self, request: Any, timeout: Any) -> audit_pb2.ListAuditRecordsResponse:
            self.calls += 1
            return audit_pb2.ListAuditRecordsResponse(records=many(10), next_page_token="1")

    stub = Greedy()
    pager = Pager(stub, audit_pb2.ListAuditRecordsRequest(), 4, None)  # type: ignore[arg-type]
    assert [[r.id for r in page] for page in pager] == [[10, 9, 8, 7]]
    assert (stub.calls, pager.count, pager.more) == (1, 4, "7")


def test_a_repeated_token_ends_the_paging() -> None:
    class Stuck:
        def ListAuditRecords(self, request: Any, timeout: Any) -> audit_pb2.ListAuditRecordsResponse:
            return audit_pb2.ListAuditRecordsResponse(records=many(1), next_page_token="same")

    pager = Pager(Stuck(), audit_pb2.ListAuditRecordsRequest(), None, None)  # type: ignore[arg-type]
    assert len(list(pager)) == 2


# --- what is printed ----------------------------------------------------------------------


def test_table(
    service: FakeAudit, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # TRAIL's times were made at collection, maybe minutes before this runs: its ages are NOW's.
    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:  # type: ignore[override]
            return cls.fromtimestamp(NOW.timestamp(), tz)

    monkeypatch.setattr("opmasctl.audit.datetime", Clock)
    assert cli(service, "audit") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "TIME    ACTOR                   FROM                 VIA   OPERATION    TARGET  "
        "RESULT             MESSAGE",
        "2m ago  token:00000000000000aa  ipv4:10.0.0.5:51234  rest  StopAgent    web-1   "
        "OK                 -",
        "5h ago  anonymous               ipv4:203.0.113.9     grpc  DeleteAgent  -       "
        f"UNAUTHENTICATED{TIMES}7  missing or invalid credentials",
        "3d ago  local                   unix:                grpc  CreateAgent  web-1   "
        "INVALID_ARGUMENT   spec.command: must not be empty",
    ]
    assert err == ""


def test_wide(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "-o", "wide", "audit", "--agent", "web-1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "ID  TIME                  ACTOR                   FROM                 VIA   OPERATION    "
        "TARGET  RESULT            NODE  MESSAGE                          PARAMETERS"
    )
    assert len(lines) == 3
    assert lines[1].split() == [
        "3",
        clock_text(TRAIL[0].time),
        "token:00000000000000aa",
        "ipv4:10.0.0.5:51234",
        "rest",
        "StopAgent",
        "web-1",
        "OK",
        "n1",
        "-",
        '{"agent_id":"web-1","timeout":"5s"}',
    ]
    assert lines[2].endswith('must not be empty  {"agent_id":"web-1","spec":{"name":"web","replicas":2}}')


def test_the_table_fits_the_terminal_by_cutting_the_message() -> None:
    text = audit_table(TRAIL, TableStyle(width=120, colour=True), NOW)
    lines = text.splitlines()
    assert "\x1b[32mOK\x1b[0m" in lines[1] and f"\x1b[31mUNAUTHENTICATED{TIMES}7\x1b[0m" in lines[2]
    plain = audit_table(TRAIL, TableStyle(width=120), NOW).splitlines()
    assert max(len(line) for line in plain) == 120
    assert plain[2].endswith("  missing or invalid c…") and plain[1].split()[6] == "web-1"


def test_control_characters_are_shown_not_acted_on(
    service: FakeAudit, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = audit_pb2.AuditRecord(
        id=9, actor="anonymous", operation="Evil\x1b[2J", message="one\ntwo\x9b", result="NOT_FOUND", count=1
    )
    service.trail = [hostile]
    assert cli(service, "audit") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out
    assert "Evil\\x1b[2J" in out and "one\\ntwo\\x9b" in out and len(out.splitlines()) == 2
    assert visible("") == "-" and visible("plain") == "plain"


def test_json_is_the_rest_document(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "-o", "json", "audit", "--limit", "2") == 0
    document = json.loads(capsys.readouterr().out)
    expected = audit_pb2.ListAuditRecordsResponse(records=TRAIL[:2], next_page_token="2")
    assert document == message_to_dict(expected)
    first, second = document["records"]
    assert first["id"] == "3" and first["entryPoint"] == "rest" and first["parameters"]["timeout"] == "5s"
    assert second["count"] == 7 and second["result"] == "UNAUTHENTICATED"
    assert document["nextPageToken"] == "2"


@pytest.mark.parametrize("fmt", ["json", "yaml"])
@pytest.mark.parametrize("count", [0, 1, 3])
def test_documents_written_a_page_at_a_time_are_the_whole_document(
    fmt: str, count: int, service: FakeAudit, capsys: pytest.CaptureFixture[str]
) -> None:
    newer = many(count)
    for record in newer:
        record.id += 100
    # One key a level: a Struct's keys come in any order off the wire, and the text must match.
    older = []
    for record in TRAIL[:count]:
        copy = audit_pb2.AuditRecord()
        copy.CopyFrom(record)
        copy.ClearField("parameters")
        copy.parameters.update({"spec": {"name": "web"}})
        older.append(copy)
    service.trail = [*newer, *older]
    service.largest_page = 2
    assert cli(service, "-o", fmt, "audit", "--all") == 0
    whole = audit_pb2.ListAuditRecordsResponse(records=service.trail)
    out = capsys.readouterr().out
    assert out == dump(message_to_dict(whole), fmt)
    parsed = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert len(parsed["records"]) == len(service.trail) and parsed["nextPageToken"] == ""


def test_a_limit_that_leaves_records_says_so(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "audit", "--limit", "2") == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    assert err == "the newest 2 records shown: --limit N or --all shows more\n"


def test_all_as_a_table_has_one_header(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    service.largest_page = 1
    assert cli(service, "audit", "--all") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(service.requests) == 3 and len(lines) == 4 and lines[0].startswith("TIME")


def test_none(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    service.trail = []
    assert cli(service, "audit") == 0
    assert capsys.readouterr() == ("", "no audit records\n")
    assert cli(service, "audit", "--actor", "nobody") == 0
    assert capsys.readouterr() == ("", "no audit records match\n")
    assert cli(service, "-o", "json", "audit") == 0
    assert json.loads(capsys.readouterr().out) == {"records": [], "nextPageToken": ""}


# --- refusals and usage errors ------------------------------------------------------------


def test_not_allowed_is_exit_5_with_the_hint(service: FakeAudit, capsys: pytest.CaptureFixture[str]) -> None:
    def denied(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "the audit trail needs the admin role")

    service.handler = denied
    assert cli(service, "audit") == 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "error: permission_denied: the audit trail needs the admin role",
        "  the token's role does not allow this (the token from --token)",
    ]


def test_without_a_token_is_unauthenticated_with_the_hint(
    tmp_path: Path, service: FakeAudit, capsys: pytest.CaptureFixture[str]
) -> None:
    def unauthenticated(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid credentials")

    service.handler = unauthenticated
    assert run(["--server", service.address, "audit"]) == 5  # type: ignore[attr-defined]
    assert service.metadata == [None]
    path = tmp_path / "config" / "opmas" / "opmasctl.yaml"
    assert capsys.readouterr().err.splitlines()[1] == (
        f"  this daemon needs a token over TCP: give --token, $OPMAS_TOKEN or `token:` in {path}; "
        "`opmasctl tokens create` on the daemon's host makes one"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent", "Web_1"], "argument --agent: invalid agent id 'Web_1'"),
        (["--agent", "a.b"], "argument --agent: invalid agent id 'a.b'"),
        (["--agent", "manager"], "argument --agent: invalid agent id 'manager': reserved"),
        (["--agent", ""], "argument --agent: an agent id must not be empty"),
        (["--agent", "x" * 64], "argument --agent: invalid agent id"),
        (["--actor", ""], "argument --actor: must not be empty"),
        (["--actor", "x" * 161], "argument --actor: too long: at most 160 characters"),
        (["--limit", "0"], "argument --limit: invalid number '0': must be between 1 and 100000"),
        (["--limit", "100001"], "argument --limit: invalid number '100001'"),
        (["--limit", "many"], "argument --limit: invalid number 'many'"),
        (["--limit", "5", "--all"], "argument --all: not allowed with argument --limit"),
        (["--since", "soon"], "invalid --since 'soon': give a duration"),
        (["--since=-5m"], "invalid --since '-5m': must not be negative"),
        (
            ["--since", "2026-01-01T00:00:00"],
            "invalid --since '2026-01-01T00:00:00': a time needs its offset",
        ),
    ],
)
def test_bad_options_are_usage_errors_naming_them(
    argv: list[str], message: str, service: FakeAudit, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(service, "audit", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: opmasctl audit"), err
    assert service.requests == []


def test_the_longest_actor_and_agent_id_are_taken(service: FakeAudit) -> None:
    assert cli(service, "audit", "--actor", "x" * 160, "--agent", "a" * 63) == 0
    assert (service.requests[0].actor, service.requests[0].agent_id) == ("x" * 160, "a" * 63)


# --- registration and completion ----------------------------------------------------------


def test_audit_is_registered_like_the_others() -> None:
    parser = build_parser()
    args = parser.parse_args(["audit"])
    assert args.group == "audit" and args.command_name == "audit" and callable(args.handler)
    assert (args.limit, args.all, args.agent, args.actor, args.since) == (50, False, None, None, None)
    assert "audit" in parser.format_help()


def test_agent_completes_agent_ids_and_nothing_else_of_audit_does() -> None:
    (groups,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    audit_parser = groups.choices["audit"]
    completers = {
        action.dest: getattr(action, "completer", None)
        for action in audit_parser._actions
        if hasattr(action, "completer")
    }
    assert completers == {"agent": completion.agent_ids}


def test_a_tab_after_agent_asks_the_daemon(service: FakeAudit) -> None:
    line = f"opmasctl --server {service.address} --token {ADMIN} audit --agent we"  # type: ignore[attr-defined]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"opmasctl-tab-{os.getpid()}-{time.monotonic_ns()}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPMAS_", "_ARC"))},
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_SHELL": "bash",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
    }
    try:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "opmasctl")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        words = [w for w in out.read_text().split("\013") if w] if out.exists() else []
    finally:
        out.unlink(missing_ok=True)
    assert sorted(words) == ["web-1", "web-2"], result.stderr
    assert service.requests == []  # completing asks for agents, never for the trail
