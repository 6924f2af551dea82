"""Every error a layer reports upwards: the domain errors and the bases of backend failures.

Domain errors (NotFound, InvalidArgument, ...) are the manager's verdict on a request; backend
errors (StoreError, BusError, LaunchError) say that the database, NATS or the process runtime
failed. api/errors.py maps each kind to one status code, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


class OpmasError(Exception):
    """Base of every error the manager reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(OpmasError):
    def __init__(self, resource_type: str, name: str, message: str | None = None) -> None:
        super().__init__(message or f"{resource_type} {name!r} not found")
        self.resource_type = resource_type
        self.name = name


class AlreadyExists(OpmasError):
    def __init__(self, resource_type: str, name: str, message: str | None = None) -> None:
        super().__init__(message or f"{resource_type} {name!r} already exists")
        self.resource_type = resource_type
        self.name = name


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


# The most violations one error lists (see InvalidArgument).
MAX_VIOLATIONS = 10


class InvalidArgument(OpmasError):
    """A request was malformed; violations name each bad field."""

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        if len(violations) > MAX_VIOLATIONS:
            # Every violation rides in the reply's status (gRPC trailers, whose limit a client
            # sets at 16 KiB by default): ten bad ids say what is wrong as well as ten thousand.
            rest = len(violations) - MAX_VIOLATIONS
            more = FieldViolation(violations[MAX_VIOLATIONS].field, f"and {rest} more problem(s), not listed")
            violations = [*violations[:MAX_VIOLATIONS], more]
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in violations) or "invalid argument"
        super().__init__(message)
        self.violations = violations

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class FailedPrecondition(OpmasError):
    pass


class Unavailable(OpmasError):
    pass


class DeadlineExceeded(OpmasError):
    pass


class Unimplemented(OpmasError):
    pass


# -- backend failures ------------------------------------------------------------------------


class BackendError(Exception):
    """A store, bus or runtime could not do what was asked; the message says why."""


class StoreError(BackendError):
    """The store could not complete an operation (connection lost, disk full, ...)."""


class StoreRejected(StoreError):
    """The database refused the values themselves (a constraint, a value too long): unlike a
    lost connection, trying the same write again cannot succeed."""


class StoreDegraded(StoreError):
    """Written where this node keeps its own state, not yet where the fleet shares it (the
    shared database is unreachable): the store keeps it and writes it there when it is back,
    so the caller must not write it again."""


class BusError(BackendError):
    """A message bus operation failed."""


class BusRejected(BusError):
    """The bus refused the message itself (larger than the server's max_payload)."""


class BusTimeout(BusError):
    """Nobody answered a request within its timeout."""


class BusUnavailable(BusError):
    """The bus is not connected (server down, reconnecting)."""


class LaunchError(BackendError):
    """The agent's program could not be started; the message says why."""


class Unauthenticated(OpmasError):
    """No valid credentials: none given, malformed, unknown, expired or revoked."""


class PermissionDenied(OpmasError):
    """Valid credentials whose role does not allow the operation."""
