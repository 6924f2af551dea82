"""Domain errors → status codes with google.rpc details, in one place.

gRPC sends the code; REST derives its HTTP status from it (grpc-gateway's table); the NATS
manager API names it ("NOT_FOUND") in its error responses. This is the only mapping to keep right.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from opmasd.core import errors
from opmasd.core.errors import BusTimeout, BusUnavailable, StoreError, StoreRejected

_CODES: list[tuple[type[Exception], int]] = [
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
    (errors.Unimplemented, code_pb2.UNIMPLEMENTED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    # The database refused the values (first: it is a StoreError too); the message says why.
    (StoreRejected, code_pb2.INVALID_ARGUMENT),
    (StoreError, code_pb2.UNAVAILABLE),
    (BusUnavailable, code_pb2.UNAVAILABLE),
    (BusTimeout, code_pb2.DEADLINE_EXCEEDED),
]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def code_of(exc: Exception) -> int:
    """The google.rpc code for exc; INTERNAL for anything not a known domain error."""
    return next((c for cls, c in _CODES if isinstance(exc, cls)), code_pb2.INTERNAL)


def is_known(exc: Exception) -> bool:
    """Whether exc is an error of ours (a verdict to report), not a bug (to log with its traceback)."""
    return any(isinstance(exc, cls) for cls, _ in _CODES)


def code_name(exc: Exception) -> str:
    """The code's name, e.g. "NOT_FOUND", as the NATS API writes it."""
    return str(code_pb2.Code.Name(code_of(exc)))


def to_status_pb(exc: Exception) -> status_pb2.Status:
    code = code_of(exc)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    status = status_pb2.Status(code=code, message=message)
    if isinstance(exc, errors.InvalidArgument):
        status.details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in exc.violations
                    ]
                )
            )
        )
    if isinstance(exc, errors.NotFound | errors.AlreadyExists):
        status.details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=f"opmas.v1.{exc.resource_type.capitalize()}",
                    resource_name=exc.name,
                    description=message,
                )
            )
        )
    return status


def to_grpc_status(exc: Exception) -> grpc.Status:
    status: grpc.Status = rpc_status.to_status(to_status_pb(exc))
    return status


# grpc-gateway's HTTP status for each code (runtime/errors.go, HTTPStatusFromCode).
HTTP_STATUS: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}


def http_status(code: int) -> int:
    return HTTP_STATUS.get(code, 500)


def bad_request_status(field: str, description: str) -> status_pb2.Status:
    """INVALID_ARGUMENT with one field violation, as the servicer reports a bad field."""
    return to_status_pb(errors.InvalidArgument.single(field, description))
