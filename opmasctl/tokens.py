"""The `opmasctl tokens ...` commands: create, list and revoke the API tokens of remote callers.

A token is "opmas_<id>_<secret>"; the daemon keeps only a hash of it, so `tokens create` is the
one time it is shown. Managing tokens needs the admin role: a caller on the local unix socket
has it, a remote one needs an admin token.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

import grpc
from google.protobuf import timestamp_pb2

from opmas.v1 import auth_pb2, tokens_pb2
from opmasctl.commands import Context, UsageError
from opmasctl.exits import EXIT_OK, exit_status
from opmasctl.output import (
    EMPTY,
    clock_text,
    enum_text,
    key_values,
    relative_text,
    timestamp_text,
)
from opmasctl.parsing import argtype, enum_choices, parse_seconds
from opmasctl.tables import GREEN, RED, YELLOW, TableStyle, render

Handler = Callable[[Context, argparse.Namespace], int]

ROLES = enum_choices(auth_pb2.Role.items(), "ROLE_")
SECRET_WARNING = (
    "warning: this is the only time the token is shown: opmasd keeps only a hash of it and "
    "cannot show it again; store it now"
)
_BARE_NUMBER = re.compile(r"^[+-]?\d+(\.\d*)?$")
# A whole token pasted where its id is wanted: the id is its middle part.
_WHOLE_TOKEN = re.compile(r"^opmas_(?P<id>[^_]+)_.+$")
# Free text, cut first to fit a terminal.
_ELASTIC = frozenset({"CREATED-BY", "DESCRIPTION"})
_STATE_COLOURS = {"active": GREEN, "expired": YELLOW, "revoked": RED}
_TimeField = Literal["created_at", "expires_at", "revoked_at"]


def parse_expires(text: str, now: datetime | None = None) -> timestamp_pb2.Timestamp | None:
    """--expires: a duration from now (30d, 12h, 90m), an RFC 3339 time, or never (None)."""
    value = text.strip()
    if value.lower() == "never":
        return None
    now = now or datetime.now(UTC)
    if _BARE_NUMBER.match(value):
        raise ValueError(f"invalid value {text!r}: give the duration's unit (30d, 12h, 90m)")
    try:
        seconds = parse_seconds(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"invalid value {text!r}: give a duration (30d, 12h, 90m), a time "
                "(2026-12-31T23:59:59Z) or never"
            ) from None
        if when.tzinfo is None:
            raise ValueError(f"invalid value {text!r}: a time needs its offset (Z, +01:00)") from None
    else:
        if seconds <= 0:
            raise ValueError(f"invalid value {text!r}: the duration must be more than 0")
        try:
            when = now + timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"invalid value {text!r}: too far ahead") from None
    if when <= now:
        raise ValueError(f"invalid value {text!r}: that time is past")
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromDatetime(when.astimezone(UTC).replace(tzinfo=None))
    except (ValueError, OverflowError):
        raise ValueError(f"invalid value {text!r}: the time is out of range") from None
    return stamp


def add_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`tokens create|list|revoke` under the top-level commands."""
    help_ = "manage the API tokens of remote callers (needs the admin role)"
    tokens = groups.add_parser("tokens", help=help_, description=help_, parents=[common])
    sub = tokens.add_subparsers(dest="command_name", metavar="SUBCOMMAND", required=True)

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_, description=help_, parents=[common])
        command.set_defaults(handler=handler, parser=command)
        return command

    p = add("create", tokens_create, "create a token; its secret is printed this once")
    p.add_argument("--role", required=True, choices=list(ROLES), help="what the token may do")
    p.add_argument(
        "--expires",
        type=argtype(parse_expires),
        metavar="WHEN",
        help="a duration from now (30d, 12h, 90m), an RFC 3339 time, or never (default)",
    )
    p.add_argument("--description", default="", metavar="TEXT", help="what the token is for")

    p = add("list", tokens_list, "list the tokens, never their secrets")
    p.add_argument("--all", action="store_true", help="also the revoked and expired ones")

    p = add("revoke", tokens_revoke, "revoke tokens: the daemon refuses them from now on")
    # Not ID: that metavar is the agent ids', which complete from the daemon's agents.
    p.add_argument("token_ids", metavar="TOKEN_ID", nargs="+", help="token ids, as `tokens list` shows them")


def role_text(role: int) -> str:
    try:
        return enum_text(auth_pb2.Role.Name(role), "ROLE_")  # type: ignore[arg-type]
    except ValueError:
        return f"role {role}"


def state_text(token: tokens_pb2.ApiToken, now: datetime) -> str:
    if token.HasField("revoked_at"):
        return "revoked"
    if token.HasField("expires_at") and token.expires_at.ToDatetime(tzinfo=UTC) <= now:
        return "expired"
    return "active"


def _time(
    token: tokens_pb2.ApiToken, field: _TimeField, now: datetime, wide: bool, unset: str = EMPTY
) -> str:
    """A time as the table shows it: 3d ago or in 27d (-o wide: RFC 3339), or `unset`."""
    if not token.HasField(field):
        return unset
    stamp: timestamp_pb2.Timestamp = getattr(token, field)
    return clock_text(stamp) if wide else relative_text(stamp, now)


def tokens_table(
    tokens: Sequence[tokens_pb2.ApiToken], style: TableStyle, now: datetime | None = None
) -> str:
    """ID ROLE CREATED EXPIRES REVOKED CREATED-BY DESCRIPTION; -o wide adds STATE and shows
    the times as RFC 3339 instead of ages."""
    now = now or datetime.now(UTC)
    wide = style.wide
    headers = ["ID", "ROLE", "CREATED", "EXPIRES", "REVOKED", "CREATED-BY", "DESCRIPTION"]
    rows = [
        [
            token.token_id,
            role_text(token.role),
            _time(token, "created_at", now, wide),
            _time(token, "expires_at", now, wide, unset="never"),
            _time(token, "revoked_at", now, wide),
            token.created_by or EMPTY,
            token.description or EMPTY,
        ]
        for token in tokens
    ]
    colours = {}
    if wide:
        headers.insert(2, "STATE")
        for row, token in zip(rows, tokens, strict=True):
            row.insert(2, state_text(token, now))
        colours = {2: _STATE_COLOURS}
    elastic = [index for index, header in enumerate(headers) if header in _ELASTIC]
    return render(headers, rows, style, colours=colours, elastic=elastic)


def tokens_create(ctx: Context, args: argparse.Namespace) -> int:
    if ctx.fmt == "name":
        # The id alone would lose the secret, which is never shown again.
        raise UsageError("-o name: tokens create prints a secret; use the table, -o json or -o yaml")
    request = tokens_pb2.CreateTokenRequest(role=ROLES[args.role], description=args.description)
    if args.expires is not None:
        request.expires_at.CopyFrom(args.expires)
    response = ctx.tokens.CreateToken(request, timeout=ctx.timeout)
    token = response.token
    pairs = [
        ("ID", token.token_id),
        ("Role", role_text(token.role)),
        ("Expires", timestamp_text(token.expires_at) if token.HasField("expires_at") else "never"),
    ]
    if token.description:
        pairs.append(("Description", token.description))
    human = key_values(pairs) + "Token (shown this once):\n" + response.secret + "\n"
    ctx.emit(response, human)
    print(SECRET_WARNING, file=sys.stderr)
    return EXIT_OK


def tokens_list(ctx: Context, args: argparse.Namespace) -> int:
    request = tokens_pb2.ListTokensRequest(include_inactive=args.all)
    response = ctx.tokens.ListTokens(request, timeout=ctx.timeout)
    if ctx.human and not response.tokens:
        print(
            "no tokens" if args.all else "no active tokens (--all lists revoked and expired ones)",
            file=sys.stderr,
        )
        return EXIT_OK
    ids = [token.token_id for token in response.tokens]
    ctx.emit(response, tokens_table(response.tokens, ctx.style), ids)
    return EXIT_OK


def token_id(text: str) -> str:
    """A token id as given; a whole token pasted instead gives its id (and is not echoed)."""
    whole = _WHOLE_TOKEN.match(text.strip())
    return whole["id"] if whole else text.strip()


def tokens_revoke(ctx: Context, args: argparse.Namespace) -> int:
    """Each id in turn: an unknown (or malformed) one is reported and the others still revoked;
    the exit status is that of the first failure (as for several agents). Any other error (not
    allowed, no daemon) ends the command at once."""
    first_failure: int | None = None
    for wanted in dict.fromkeys(token_id(text) for text in args.token_ids):
        if not wanted:
            raise UsageError("a token id is empty")
        try:
            token = ctx.tokens.RevokeToken(
                tokens_pb2.RevokeTokenRequest(token_id=wanted), timeout=ctx.timeout
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
            print(f"error: token {wanted}: {code.name.lower()}: {details}", file=sys.stderr)
            first_failure = exit_status(code) if first_failure is None else first_failure
            continue
        shown = token.token_id or wanted
        line = f"token {shown} revoked"
        if token.HasField("revoked_at"):
            line += f" ({timestamp_text(token.revoked_at)})"
        # No list message: JSON and YAML are a stream of ApiTokens, one per token revoked.
        ctx.emit_item(token, line + "\n", [shown])
    return first_failure if first_failure is not None else EXIT_OK
