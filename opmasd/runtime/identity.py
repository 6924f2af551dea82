"""Running an agent's program as another user and group (the process runtime): through setpriv.

The program is started as `setpriv --reuid=U --regid=G --init-groups -- argv`: setpriv
(util-linux, on every Linux host) changes the identity and then execs the program in place, so
the agent keeps the PID the runtime watches, and it does so after the cgroup join (which needs
opmasd's own rights) has run. A group without a user leaves opmasd's user and clears the
supplementary groups. Not as root, only opmasd's own user and group can be named (the manager
refuses others), and the program then runs as it is.
"""

from __future__ import annotations

import grp
import os
import pwd

from opmasd.core.errors import LaunchError

SETPRIV = "/usr/bin/setpriv"


def as_identity(user: str, group: str, command: tuple[str, ...]) -> tuple[str, ...]:
    """`command`, run as `user` and `group` ("" each: unchanged; both "": command itself). A
    user that is opmasd's own, with no group, is no change (and setpriv could not set the
    supplementary groups without root)."""
    own_user = not user or _uid(user) == os.geteuid()
    if own_user and not group and user:
        return command
    if own_user and (not group or _gid(group) == os.getegid()) and os.geteuid() != 0:
        return command  # not root: nothing to change, and setpriv could not drop the groups
    if not user and not group:
        return command
    argv = [SETPRIV]
    if user:
        argv += [f"--reuid={user}", f"--regid={group or _primary_group(user)}", "--init-groups"]
    else:
        argv += [f"--regid={group}", "--clear-groups"]
    return (*argv, "--", *command)


def _uid(user: str) -> int | None:
    try:
        return (pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)).pw_uid
    except (KeyError, OverflowError):
        return None


def _gid(group: str) -> int | None:
    try:
        return (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
    except (KeyError, OverflowError):
        return None


def _primary_group(user: str) -> int:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise LaunchError(f"no user {user!r} on this host") from None
    return entry.pw_gid


def check_group(group: str) -> None:
    """LaunchError for a group this host does not know (setpriv's own word is terse)."""
    try:
        grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except (KeyError, OverflowError):
        raise LaunchError(f"no group {group!r} on this host") from None
