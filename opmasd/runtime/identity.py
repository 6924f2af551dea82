"""Running an agent's program as another user and group (the process runtime): through setpriv.

The program is started as `setpriv --reuid=U --regid=G --init-groups -- argv`: setpriv
(util-linux, on every Linux host) changes the identity and then execs the program in place, so
the agent keeps the PID the runtime watches, and it does so after the cgroup join (which needs
opmasd's own rights) has run. A group without a user leaves opmasd's user and clears the
supplementary groups. The same setpriv gives the agent only the capabilities its spec names
(privilege_options), and no new privileges when asked. Not as root, only opmasd's own user and
group can be named (the manager refuses others), and the program then runs as it is.
"""

from __future__ import annotations

import os

from opmasd.core.accounts import gid_of, uid_of, user_entry
from opmasd.core.errors import LaunchError
from opmasd.runtime.base import LaunchRequest

SETPRIV = "/usr/bin/setpriv"


def as_identity(
    user: str, group: str, command: tuple[str, ...], options: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """`command`, run as `user` and `group` ("" each: unchanged) with setpriv's `options`
    (privilege_options); the command itself when there is nothing to change. A user that is
    opmasd's own, with no group, is no change (and setpriv could not set the supplementary
    groups without root)."""
    identity = _identity_options(user, group)
    if not identity and not options:
        return command
    return (SETPRIV, *identity, *options, "--", *command)


def _identity_options(user: str, group: str) -> list[str]:
    own_user = not user or uid_of(user) == os.geteuid()
    if own_user and not group and user:
        return []
    if own_user and (not group or gid_of(group) == os.getegid()) and os.geteuid() != 0:
        return []  # not root: nothing to change, and setpriv could not drop the groups
    if not user and not group:
        return []
    if user:
        return [f"--reuid={user}", f"--regid={group or _primary_group(user)}", "--init-groups"]
    return [f"--regid={group}", "--clear-groups"]


def privilege_options(request: LaunchRequest) -> tuple[str, ...]:
    """setpriv options for the request's capabilities and no_new_privileges (the only sandbox
    field this runtime enforces; the manager refuses the others). Capabilities named: the
    bounding and inheritable sets become exactly those, and the ambient set too for a user other
    than root (so that they survive the change of user and the exec); none named: nothing
    changes (this runtime's default)."""
    options: list[str] = []
    if request.capabilities:
        caps = ",".join(f"+{name.removeprefix('CAP_').lower()}" for name in request.capabilities)
        options += [f"--bounding-set=-all,{caps}", f"--inh-caps=-all,{caps}"]
        if request.user and uid_of(request.user) != 0:
            options.append(f"--ambient-caps=-all,{caps}")
    if request.sandbox.no_new_privileges:
        options.append("--no-new-privs")
    return tuple(options)


def _primary_group(user: str) -> int:
    entry = user_entry(user)
    if entry is None:
        raise LaunchError(f"no user {user!r} on this host")
    return entry.pw_gid


def check_group(group: str) -> None:
    """LaunchError for a group this host does not know (setpriv's own word is terse)."""
    if gid_of(group) is None:
        raise LaunchError(f"no group {group!r} on this host")
