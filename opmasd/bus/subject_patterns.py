"""NATS subject patterns: their grammar, whether two can match one subject, and which ones an
agent may be given for its data (logs, findings, ...) on the embedded server.

An agent's data patterns are what it may publish and subscribe to outside its own subjects
(DESIGN §5). They must not reach anything that is not data: the `{prefix}.` tree (other agents'
commands and heartbeats, the manager's subjects), request inboxes (`_INBOX.`: replies meant for
opmasd or for other agents), or the server's own `$` subjects (micro services, the system
account). NATS cannot say "everything but those" (a deny rule would also win over the agent's
own subjects), so such a pattern is refused, not trimmed.
"""

from __future__ import annotations

import re

# A token of a pattern this daemon writes into nats-server's configuration: plain characters
# only (no quotes or spaces that would end the string), or a wildcard.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
INBOX_ROOT = "_INBOX"


def check_pattern(pattern: str) -> None:
    """ValueError unless pattern is tokens of letters, digits, '-', '_' (or '*', or a final '>')
    separated by dots."""
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i == len(tokens) - 1:
            continue
        if token != "*" and not _TOKEN.match(token):
            raise ValueError(
                f"{pattern[:80]!r} is not a NATS subject pattern of tokens of letters, digits, '-' and "
                "'_' separated by dots ('*' for one token, '>' last for the rest)"
            )


def overlap(a: str, b: str) -> bool:
    """Whether some subject matches both patterns (wildcards on either side)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if x == ">" or y == ">":
            return True  # the other has a token here, and '>' takes it and the rest
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)


def reserved_for(prefix: str) -> tuple[tuple[str, str], ...]:
    """The subject trees no data pattern may reach, each with why."""
    return (
        (f"{prefix}.>", f"the agents' and the manager's own subjects ({prefix}.…)"),
        (f"{INBOX_ROOT}.>", "the request inboxes, where replies meant for opmasd or other agents go"),
    )


def check_data_pattern(pattern: str, prefix: str) -> None:
    """ValueError saying why, for a pattern an agent may not be given for its data."""
    check_pattern(pattern)  # which also keeps out the server's own subjects ($SRV, $SYS, ...)
    for tree, what in reserved_for(prefix):
        if overlap(pattern, tree):
            raise ValueError(
                f"{pattern!r} could match {tree}: {what}; one agent could then read or send another's "
                "messages. Name the data subjects explicitly (for example 'findings.>')"
            )
