"""The `opmasctl audit` command: the daemon's audit trail, newest first.

Every operation that changes something is recorded once answered (who, from where, through
which entry point, what, the result), and so is every refused attempt (a burst of the same
refusal as one record with its count). Reading the trail needs the admin role.

Records come a page of at most 1000 at a time, until --limit of them (default 50) or, with
--all, the end of the trail. The table of a --limit is drawn once all are read; with --all, and
in every other format, each page is written as it comes, so memory holds a page, not the trail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from google.protobuf import json_format

from opmas.v1 import audit_pb2, audit_pb2_grpc
from opmasctl.commands import Context, UsageError
from opmasctl.exits import EXIT_OK
from opmasctl.logs import parse_since
from opmasctl.output import EMPTY, clock_text, dump, message_to_dict, plain_numbers, relative_text, write
from opmasctl.parsing import argtype, parse_agent_id
from opmasctl.tables import GREEN, RED, TableStyle, render

# The daemon's largest page (ListAuditRecordsRequest.page_size).
MAX_PAGE_SIZE = 1000
DEFAULT_LIMIT = 50
MAX_LIMIT = 100_000
MAX_ACTOR = 160
# Free text, cut first to fit a terminal.
_ELASTIC = frozenset({"TARGET", "MESSAGE", "PARAMETERS"})
_HEADERS = ("TIME", "ACTOR", "FROM", "VIA", "OPERATION", "TARGET", "RESULT", "MESSAGE")
_OK = "OK"
# Between the result of a burst of refusals and its count (UNAUTHENTICATED, the sign, 7).
TIMES = "\N{MULTIPLICATION SIGN}"


def parse_limit(text: str) -> int:
    """--limit: how many records, 1 to MAX_LIMIT."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"invalid number {text!r}: give a whole number of records") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"invalid number {text!r}: must be between 1 and {MAX_LIMIT} (--all: no limit)")
    return value


def parse_actor(text: str) -> str:
    """--actor: who, as the records name callers; free text, but not empty and not a book."""
    if not text:
        raise ValueError("must not be empty (local, token:<id> or anonymous)")
    if len(text) > MAX_ACTOR:
        raise ValueError(f"too long: at most {MAX_ACTOR} characters")
    return text


def add_command(
    groups: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`audit` among the top-level commands."""
    help_ = "show the audit trail: what was changed, by whom, and refused attempts (needs the admin role)"
    p = groups.add_parser("audit", help=help_, description=help_, parents=[common])
    p.set_defaults(handler=audit, parser=p, command_name="audit")
    p.add_argument(
        "--agent",
        type=argtype(parse_agent_id),
        metavar="ID",
        help="only the records that acted on this agent (or token id)",
    )
    p.add_argument(
        "--actor",
        type=argtype(parse_actor),
        metavar="ACTOR",
        help="only the records of this caller: local (the unix socket), token:<id> or anonymous",
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only the records since then: a duration back from now (30m, 2h, 1d) or an RFC 3339 time",
    )
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument(
        "--limit",
        type=argtype(parse_limit),
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"the newest N records (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})",
    )
    how_many.add_argument("--all", action="store_true", help="every record, however many")


class Pager:
    """The records a request matches, a page at a time (newest first), until `limit` of them
    (None: all). Once read, `count` says how many came and `more` the page_token where the
    records not read begin ("" when none are left)."""

    def __init__(
        self,
        stub: audit_pb2_grpc.AuditServiceStub,
        request: audit_pb2.ListAuditRecordsRequest,
        limit: int | None,
        timeout: float | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._limit = limit
        self._timeout = timeout
        self.count = 0
        self.more = ""

    def __iter__(self) -> Iterator[list[audit_pb2.AuditRecord]]:
        request = self._request
        seen_tokens: set[str] = set()
        while True:
            left = None if self._limit is None else self._limit - self.count
            request.page_size = MAX_PAGE_SIZE if left is None else min(MAX_PAGE_SIZE, left)
            response = self._stub.ListAuditRecords(request, timeout=self._timeout)
            records = list(response.records)
            token = response.next_page_token
            if left is not None and len(records) > left:
                # More than asked for: the rest begins after the last one kept (the API's token
                # is the last record's id).
                records = records[:left]
                token = str(records[-1].id)
            self.count += len(records)
            self.more = token
            yield records
            # A token seen before would loop forever; a well-behaved server never repeats one.
            if not token or token in seen_tokens or (self._limit is not None and self.count >= self._limit):
                return
            seen_tokens.add(token)
            request.page_token = token


def visible(text: str) -> str:
    """Text of the trail (much of it a caller's) on one line and harmless to a terminal: its
    control characters (newlines, escape sequences) shown escaped instead of acted on."""
    if text.isprintable():
        return text or EMPTY
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def result_text(record: audit_pb2.AuditRecord) -> str:
    """OK or the error's code name; a burst of N refusals has TIMES and N after it."""
    text = record.result or EMPTY
    return f"{text}{TIMES}{record.count}" if record.count > 1 else text


def parameters_text(record: audit_pb2.AuditRecord) -> str:
    """The request's fields as compact JSON, keys sorted (a Struct's order is not kept on the
    wire); - when it had none."""
    if not record.parameters.fields:
        return EMPTY
    fields = plain_numbers(json_format.MessageToDict(record.parameters))
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def audit_table(
    records: Sequence[audit_pb2.AuditRecord], style: TableStyle, now: datetime | None = None
) -> str:
    """TIME ACTOR FROM VIA OPERATION TARGET RESULT MESSAGE; -o wide adds ID, NODE and PARAMETERS
    and shows the time as RFC 3339 instead of its age."""
    now = now or datetime.now(UTC)
    wide = style.wide
    headers = list(_HEADERS)
    rows = []
    for record in records:
        when = EMPTY
        if record.HasField("time"):
            when = clock_text(record.time) if wide else relative_text(record.time, now)
        row = [
            when,
            record.actor,
            record.peer,
            record.entry_point,
            record.operation,
            record.target,
            result_text(record),
            record.message,
        ]
        if wide:
            row = [str(record.id), *row[:7], record.node, row[7], parameters_text(record)]
        rows.append([visible(cell) for cell in row])
    if wide:
        headers = ["ID", *headers[:7], "NODE", headers[7], "PARAMETERS"]
    column = headers.index("RESULT")
    colours = {column: {row[column]: GREEN if row[column] == _OK else RED for row in rows}}
    elastic = [index for index, header in enumerate(headers) if header in _ELASTIC]
    return render(headers, rows, style, colours=colours, elastic=elastic)


def write_document(pager: Pager, fmt: str) -> None:
    """A ListAuditRecordsResponse of every record read (the pages merged; nextPageToken where the
    records not read begin), in JSON or YAML, written a page at a time: the same text as dump()
    of the whole document, without holding it."""
    first = True
    if fmt == "json":
        write('{\n  "records": [')
        for page in pager:
            for record in page:
                text = json.dumps(message_to_dict(record), indent=2, ensure_ascii=False)
                write(("\n" if first else ",\n") + textwrap.indent(text, "    "))
                first = False
        write(("]" if first else "\n  ]") + ',\n  "nextPageToken": ' + json.dumps(pager.more) + "\n}\n")
        return
    write("records:")
    for page in pager:
        if page:
            write(("\n" if first else "") + dump([message_to_dict(record) for record in page], fmt))
            first = False
    write((" []\n" if first else "") + dump({"nextPageToken": pager.more}, fmt))


def _request(args: argparse.Namespace) -> audit_pb2.ListAuditRecordsRequest:
    request = audit_pb2.ListAuditRecordsRequest(agent_id=args.agent or "", actor=args.actor or "")
    if args.since is not None:
        try:
            request.since.CopyFrom(parse_since(args.since))
        except ValueError as err:
            raise UsageError(str(err)) from None
    return request


def audit(ctx: Context, args: argparse.Namespace) -> int:
    request = _request(args)
    limit = None if args.all else args.limit
    pager = Pager(ctx.audit, request, limit, ctx.timeout)
    if ctx.fmt in ("json", "yaml"):
        write_document(pager, ctx.fmt)
        return EXIT_OK
    if ctx.fmt == "name":
        for page in pager:
            write("".join(f"{record.id}\n" for record in page))
        return EXIT_OK
    now = datetime.now(UTC)
    # A --limit's records in one table, aligned; --all's a table a page, the header once.
    pages: Iterator[list[audit_pb2.AuditRecord]] = iter(pager)
    if limit is not None:
        pages = iter([[record for page in pager for record in page]])
    style = ctx.style
    for page in pages:
        if page:
            write(audit_table(page, style, now))
            style = dataclasses.replace(style, headers=False)
    if pager.count == 0:
        filtered = args.agent or args.actor or args.since is not None
        print("no audit records match" if filtered else "no audit records", file=sys.stderr)
    elif pager.more:
        print(
            f"the newest {pager.count} records shown: --limit N or --all shows more",
            file=sys.stderr,
        )
    return EXIT_OK
