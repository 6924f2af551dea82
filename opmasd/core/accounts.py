"""This host's users and groups by name or number: the one lookup the manager (who an agent
may run as) and the runtimes (how to start it as them) share."""

from __future__ import annotations

import grp
import pwd


def user_entry(user: str) -> pwd.struct_passwd | None:
    """The passwd entry of a user name or uid; None when this host has no such user."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        return None


def uid_of(user: str) -> int | None:
    entry = user_entry(user)
    return None if entry is None else entry.pw_uid


def gid_of(group: str) -> int | None:
    """The gid of a group name or number; None when this host has no such group."""
    try:
        return (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
    except (KeyError, OverflowError):
        return None
