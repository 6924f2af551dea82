"""The daemon's open-files limit: raised for itself, and given back to the agents it starts.

opmasd holds a few descriptors per agent (a pidfd, spare ends of its log pipes), so the usual
soft limit of 1024 would stop it near 300 agents. It raises its own soft limit towards the hard
one at start; agents get the soft limit the daemon was started with (a program built around
select() must not see a larger one), unless their spec sets open_files_max.
"""

from __future__ import annotations

import resource

import structlog

log = structlog.get_logger(__name__)

# Enough for several thousand agents; more is not needed and some kernels' hard limit is huge.
WANTED_SOFT_LIMIT = 65536


def raise_open_files_limit(wanted: int = WANTED_SOFT_LIMIT) -> int:
    """Raise this process's soft RLIMIT_NOFILE to min(wanted, hard); the soft limit it had."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit", soft=soft, wanted=target, error=str(exc))
        else:
            log.info("open-files limit raised", soft=target, was=soft, hard=hard)
    return soft
