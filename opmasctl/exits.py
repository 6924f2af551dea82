"""opmasctl's exit statuses (README "Exit status"; the epilog of --help), and the one place a gRPC
status becomes one."""

from __future__ import annotations

import grpc

# Every code not in _EXIT_BY_CODE is 1.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
# The daemon did not let this caller do it: no token or one it does not accept over TCP
# (UNAUTHENTICATED), or a token whose role is too low (PERMISSION_DENIED).
EXIT_DENIED = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
_EXIT_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    # The daemon cannot be reached, or cannot serve now (shutting down, its store or NATS away):
    # worth trying again later. DEADLINE_EXCEEDED is not: the request may have been carried out.
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
}


def exit_status(code: grpc.StatusCode) -> int:
    """The exit status of a command that ended with this gRPC status."""
    return _EXIT_BY_CODE.get(code, EXIT_ERROR)


def exit_status_of(code: int) -> int:
    """The same, for a google.rpc.Code number (a bulk operation's result per agent)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return exit_status(status)
    return EXIT_ERROR
