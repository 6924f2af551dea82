"""Who an agent runs as: its spec's user and group, checked at registration
(manager.identities) and turned into setpriv for the process runtime (runtime.identity)."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from opmasd.core.model import AgentSpec
from opmasd.manager.identities import identity_refusals
from opmasd.runtime.identity import SETPRIV, as_identity

NOBODY = pwd.getpwnam("nobody")


def spec(**kw: str) -> AgentSpec:
    return AgentSpec(name="a", command=("/bin/true",), **kw)


def test_known_users_and_groups_are_accepted_as_root() -> None:
    assert identity_refusals(spec(user="nobody", group="nogroup"), euid=0) == []
    assert identity_refusals(spec(user=str(NOBODY.pw_uid)), euid=0) == []


def test_unknown_or_malformed_names_are_refused_naming_the_field() -> None:
    assert identity_refusals(spec(user="no-such-user-x"), euid=0) == [
        ("user", "no user 'no-such-user-x' on this host")
    ]
    assert identity_refusals(spec(group="no-such-group-x"), euid=0) == [
        ("group", "no group 'no-such-group-x' on this host")
    ]
    [(field, why)] = identity_refusals(spec(user="a b;rm"), euid=0)
    assert field == "user" and "is not a user name or number" in why
    # A number with leading zeros ("00" would be root, shown as something else) is no uid.
    [(field, why)] = identity_refusals(spec(user="00"), euid=0)
    assert field == "user" and "is not a user name or number" in why
    assert identity_refusals(spec(user="0", group="0"), euid=0) == []


def test_only_root_may_name_another_user() -> None:
    [(field, why)] = identity_refusals(spec(user="nobody"), euid=1000)
    assert field == "user" and why == (
        "opmasd runs as uid 1000, not root: it cannot start an agent as another user"
    )
    assert identity_refusals(spec(user="nobody"), euid=NOBODY.pw_uid) == []  # itself: fine


def test_the_process_runtime_runs_the_program_through_setpriv() -> None:
    assert as_identity("", "", ("prog", "-v")) == ("prog", "-v")
    assert as_identity("nobody", "", ("prog",)) == (
        SETPRIV, "--reuid=nobody", f"--regid={NOBODY.pw_gid}", "--init-groups", "--", "prog",
    )  # fmt: skip
    assert as_identity("", "nogroup", ("prog",)) == (
        SETPRIV,
        "--regid=nogroup",
        "--clear-groups",
        "--",
        "prog",
    )


def test_a_spec_without_user_is_stored_as_before() -> None:
    assert "user" not in spec().to_dict() and "group" not in spec().to_dict()
    both = spec(user="nobody", group="nogroup")
    assert AgentSpec.from_dict(both.to_dict()) == both


def test_not_as_root_the_own_user_and_group_run_the_program_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY.pw_uid)
    monkeypatch.setattr(os, "getegid", lambda: NOBODY.pw_gid)
    group = grp.getgrgid(NOBODY.pw_gid).gr_name
    # setpriv --clear-groups / --init-groups need root: not used for what changes nothing.
    assert as_identity("nobody", group, ("prog",)) == ("prog",)
    assert as_identity("", group, ("prog",)) == ("prog",)


def test_opmasd_s_own_user_alone_needs_no_setpriv() -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert as_identity(me, "", ("prog",)) == ("prog",)
