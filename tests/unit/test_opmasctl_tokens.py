"""`opmasctl tokens create|list|revoke` against an in-process TokenService with canned answers.

The fake records every request and the metadata it came with, so each test checks what the CLI
sent (role, expiry, ids, the token it presented) and what it printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import message, timestamp_pb2

from opmas.v1 import auth_pb2, tokens_pb2, tokens_pb2_grpc
from opmasctl.cli import build_parser, run
from opmasctl.tokens import parse_expires

SECRET = "opmas_00000000000000aa_VerySecretPart0123456789"
ADMIN = "opmas_ffffffffffffffff_AdminTokenSecret"
Handler = Callable[[Any, grpc.ServicerContext], Any]


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(when)
    return result


NOW = datetime.now(UTC)
TOKENS = [
    tokens_pb2.ApiToken(
        token_id="00000000000000aa",
        role=auth_pb2.ROLE_OPERATOR,
        description="ci deploys",
        created_at=stamp(NOW - timedelta(days=3)),
        expires_at=stamp(NOW + timedelta(days=27, minutes=1)),
        created_by="local",
    ),
    tokens_pb2.ApiToken(
        token_id="00000000000000bb",
        role=auth_pb2.ROLE_VIEWER,
        created_at=stamp(NOW - timedelta(hours=5)),
        created_by="token:ffffffffffffffff",
    ),
]
REVOKED = tokens_pb2.ApiToken(
    token_id="00000000000000cc",
    role=auth_pb2.ROLE_ADMIN,
    created_at=stamp(NOW - timedelta(days=10)),
    revoked_at=stamp(NOW - timedelta(days=2)),
    created_by="local",
)


class FakeTokens(tokens_pb2_grpc.TokenServiceServicer):
    def __init__(self) -> None:
        self.requests: list[tuple[str, message.Message]] = []
        self.metadata: list[str | None] = []
        self.handlers: dict[str, Handler] = {}
        self.known = {token.token_id: token for token in [*TOKENS, REVOKED]}

    def _answer(
        self, name: str, request: Any, context: grpc.ServicerContext, default: Callable[[], Any]
    ) -> Any:
        self.requests.append((name, request))
        self.metadata.append(dict(context.invocation_metadata()).get("authorization"))  # type: ignore[arg-type]
        handler = self.handlers.get(name)
        return handler(request, context) if handler else default()

    def sent(self, name: str) -> list[Any]:
        return [request for method, request in self.requests if method == name]

    def CreateToken(self, request, context):  # type: ignore[no-untyped-def]
        def created() -> tokens_pb2.CreateTokenResponse:
            token = tokens_pb2.ApiToken(
                token_id="00000000000000aa",
                role=request.role,
                description=request.description,
                created_at=stamp(datetime.now(UTC)),
                created_by="local",
            )
            if request.HasField("expires_at"):
                token.expires_at.CopyFrom(request.expires_at)
            return tokens_pb2.CreateTokenResponse(token=token, secret=SECRET)

        return self._answer("CreateToken", request, context, created)

    def ListTokens(self, request, context):  # type: ignore[no-untyped-def]
        tokens = [*TOKENS, REVOKED] if request.include_inactive else TOKENS
        return self._answer(
            "ListTokens", request, context, lambda: tokens_pb2.ListTokensResponse(tokens=tokens)
        )

    def RevokeToken(self, request, context):  # type: ignore[no-untyped-def]
        def revoke() -> tokens_pb2.ApiToken:
            if request.token_id not in self.known:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no token {request.token_id!r}")
            token = tokens_pb2.ApiToken()
            token.CopyFrom(self.known[request.token_id])
            if not token.HasField("revoked_at"):
                token.revoked_at.CopyFrom(stamp(datetime.now(UTC)))
            return token

        return self._answer("RevokeToken", request, context, revoke)


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPMAS_TOKEN", "OPMAS_SERVER", "OPMAS_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture
def service() -> Iterator[FakeTokens]:
    fake = FakeTokens()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    tokens_pb2_grpc.add_TokenServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        server.stop(None)


def cli(service: FakeTokens, *argv: str) -> int:
    return run(["--server", service.address, "--token", ADMIN, *argv])  # type: ignore[attr-defined]


# --- create -------------------------------------------------------------------------------


def test_create_prints_the_secret_once(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "tokens", "create", "--role", "operator", "--description", "ci deploys") == 0
    (request,) = service.sent("CreateToken")
    assert request.role == auth_pb2.ROLE_OPERATOR and request.description == "ci deploys"
    assert not request.HasField("expires_at")  # never, by default
    assert service.metadata == [f"Bearer {ADMIN}"]
    out, err = capsys.readouterr()
    assert out.count(SECRET) == 1 and SECRET not in err
    assert out.splitlines() == [
        "ID:          00000000000000aa",
        "Role:        operator",
        "Expires:     never",
        "Description: ci deploys",
        "Token (shown this once):",
        SECRET,
    ]
    assert "cannot show it again" in err


def test_create_expires_in_30_days(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "tokens", "create", "--role", "viewer", "--expires", "30d") == 0
    (request,) = service.sent("CreateToken")
    assert request.role == auth_pb2.ROLE_VIEWER
    ahead = request.expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(days=30) - timedelta(minutes=1) < ahead <= timedelta(days=30)
    assert "\nExpires: 20" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("1h30m", timedelta(minutes=90)),
    ],
)
def test_expires_durations(value: str, expected: timedelta) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    result = parse_expires(value, now)
    assert result is not None and result.ToDatetime(tzinfo=UTC) - now == expected


def test_create_expires_at_a_time_and_never(service: FakeTokens) -> None:
    assert cli(service, "tokens", "create", "--role", "admin", "--expires", "2099-01-31T12:00:00+01:00") == 0
    assert cli(service, "tokens", "create", "--role", "admin", "--expires", "never") == 0
    at, never = service.sent("CreateToken")
    assert at.role == auth_pb2.ROLE_ADMIN
    assert at.expires_at.ToJsonString() == "2099-01-31T11:00:00Z"
    assert not never.HasField("expires_at")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "give a duration (30d, 12h, 90m), a time"),
        ("30", "give the duration's unit"),
        ("-5m", "must be more than 0"),
        ("0s", "must be more than 0"),
        ("2020-01-01T00:00:00Z", "that time is past"),
        ("2099-01-01T00:00:00", "a time needs its offset"),
        ("999999999d", "too far ahead"),
    ],
)
def test_a_bad_expiry_is_a_usage_error_naming_expires(
    value: str, message: str, service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(service, "tokens", "create", "--role", "viewer", f"--expires={value}") == 2
    err = capsys.readouterr().err
    assert "argument --expires: invalid value" in err and message in err, err
    assert service.requests == []


def test_create_needs_a_known_role(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "tokens", "create") == 2
    assert cli(service, "tokens", "create", "--role", "root") == 2
    err = capsys.readouterr().err
    assert "--role" in err and "invalid choice: 'root'" in err
    assert service.requests == []


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_create_json_and_yaml_carry_the_secret(
    fmt: str, service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(service, "-o", fmt, "tokens", "create", "--role", "admin", "--expires", "12h") == 0
    out, err = capsys.readouterr()
    document = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert document["secret"] == SECRET
    assert document["token"]["tokenId"] == "00000000000000aa"
    assert document["token"]["role"] == "ROLE_ADMIN"
    assert document["token"]["expiresAt"].endswith("Z")
    assert "cannot show it again" in err and SECRET not in err


def test_create_output_name_is_refused_before_the_call(
    service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(service, "-o", "name", "tokens", "create", "--role", "admin") == 2
    assert "-o name: tokens create prints a secret" in capsys.readouterr().err
    assert service.requests == []


# --- list ---------------------------------------------------------------------------------


def test_list_table(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "tokens", "list") == 0
    (request,) = service.sent("ListTokens")
    assert not request.include_inactive
    assert capsys.readouterr().out.splitlines() == [
        "ID                ROLE      CREATED  EXPIRES  REVOKED  CREATED-BY              DESCRIPTION",
        "00000000000000aa  operator  3d ago   in 27d   -        local                   ci deploys",
        "00000000000000bb  viewer    5h ago   never    -        token:ffffffffffffffff  -",
    ]


def test_list_all_wide_shows_the_state(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "-o", "wide", "tokens", "list", "--all") == 0
    (request,) = service.sent("ListTokens")
    assert request.include_inactive
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID",
        "ROLE",
        "STATE",
        "CREATED",
        "EXPIRES",
        "REVOKED",
        "CREATED-BY",
        "DESCRIPTION",
    ]
    assert [line.split()[2] for line in lines[1:]] == ["active", "active", "revoked"]
    assert lines[3].split()[5] == REVOKED.revoked_at.ToJsonString().split(".")[0] + "Z"


def test_list_json_and_name(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "-o", "json", "tokens", "list") == 0
    document = json.loads(capsys.readouterr().out)
    assert [token["tokenId"] for token in document["tokens"]] == ["00000000000000aa", "00000000000000bb"]
    assert document["tokens"][0]["role"] == "ROLE_OPERATOR"
    assert "secret" not in json.dumps(document)
    assert cli(service, "tokens", "list", "--all", "-o", "name") == 0
    assert capsys.readouterr().out == "00000000000000aa\n00000000000000bb\n00000000000000cc\n"


def test_list_none(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    service.handlers["ListTokens"] = lambda request, context: tokens_pb2.ListTokensResponse()
    assert cli(service, "tokens", "list") == 0
    assert capsys.readouterr() == ("", "no active tokens (--all lists revoked and expired ones)\n")


# --- revoke -------------------------------------------------------------------------------


def test_revoke_with_one_unknown_id_revokes_the_others(
    service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(service, "tokens", "revoke", "00000000000000aa", "0000000000000bad", "00000000000000bb") == 3
    assert [r.token_id for r in service.sent("RevokeToken")] == [
        "00000000000000aa",
        "0000000000000bad",
        "00000000000000bb",
    ]
    out, err = capsys.readouterr()
    assert [line.split(" (")[0] for line in out.splitlines()] == [
        "token 00000000000000aa revoked",
        "token 00000000000000bb revoked",
    ]
    assert err == "error: token 0000000000000bad: not_found: no token '0000000000000bad'\n"


def test_revoke_json_is_one_line_per_token(service: FakeTokens, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "-o", "json", "tokens", "revoke", "00000000000000aa", "00000000000000cc") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(t["tokenId"], "revokedAt" in t) for t in lines] == [
        ("00000000000000aa", True),
        ("00000000000000cc", True),
    ]


def test_revoke_takes_a_whole_token_without_echoing_it(
    service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(service, "tokens", "revoke", SECRET) == 0
    assert [r.token_id for r in service.sent("RevokeToken")] == ["00000000000000aa"]
    out, err = capsys.readouterr()
    assert out.startswith("token 00000000000000aa revoked")
    assert SECRET not in out + err


def test_revoke_not_allowed_stops_with_the_hint(
    service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "tokens need the admin role")

    service.handlers["RevokeToken"] = denied
    assert cli(service, "tokens", "revoke", "00000000000000aa", "00000000000000bb") == 5
    assert len(service.sent("RevokeToken")) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "error: permission_denied: tokens need the admin role",
        "  the token's role does not allow this (the token from --token)",
    ]
    assert ADMIN not in out + err


def test_list_without_a_token_is_unauthenticated_with_the_hint(
    tmp_path: Path, service: FakeTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    def unauthenticated(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid credentials")

    service.handlers["ListTokens"] = unauthenticated
    assert run(["--server", service.address, "tokens", "list"]) == 5  # type: ignore[attr-defined]
    assert service.metadata == [None]
    path = tmp_path / "config" / "opmas" / "opmasctl.yaml"
    assert capsys.readouterr().err.splitlines()[1] == (
        f"  this daemon needs a token over TCP: give --token, $OPMAS_TOKEN or `token:` in {path}; "
        "`opmasctl tokens create` on the daemon's host makes one"
    )


# --- registration -------------------------------------------------------------------------


def test_tokens_commands_are_registered_like_the_others() -> None:
    parser = build_parser()
    for argv in (["tokens", "create", "--role", "admin"], ["tokens", "list"], ["tokens", "revoke", "x"]):
        args = parser.parse_args(argv)
        assert args.group == "tokens" and args.command_name == argv[1] and callable(args.handler)
    help_text = parser.format_help()
    assert "tokens" in help_text
