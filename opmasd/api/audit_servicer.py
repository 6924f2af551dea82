"""AuditService over grpc.aio: the audit trail, newest first, a page at a time (admins only)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2

from opmas.v1 import audit_pb2, audit_pb2_grpc
from opmasd.api import convert
from opmasd.api.grpc_servicer import unary
from opmasd.core.audit import AuditFilter, AuditRecord
from opmasd.core.errors import InvalidArgument
from opmasd.manager import AuditTrail

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def record_to_pb(rec: AuditRecord) -> audit_pb2.AuditRecord:
    parameters = struct_pb2.Struct()
    try:
        parameters.update(rec.parameters)
    except (TypeError, ValueError):  # a value Struct cannot hold: say so rather than fail the list
        parameters.update({"unreadable": True})
    return audit_pb2.AuditRecord(
        id=rec.id or 0,
        time=convert.timestamp(rec.time),
        actor=rec.actor,
        peer=rec.peer,
        entry_point=rec.entry_point,
        operation=rec.operation,
        target=rec.target,
        parameters=parameters,
        result=rec.result,
        message=rec.message,
        node=rec.node,
        count=rec.count,
    )


def filter_from_pb(request: audit_pb2.ListAuditRecordsRequest) -> AuditFilter:
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument.single("page_size", f"must be 0-{MAX_PAGE_SIZE}, got {request.page_size}")
    before_id = None
    if request.page_token:
        if not request.page_token.isdigit() or len(request.page_token) > 19 or int(request.page_token) < 1:
            raise InvalidArgument.single("page_token", "is not a page token this API gave")
        before_id = int(request.page_token)
    since = convert.when(request.since, "since") if request.HasField("since") else None
    return AuditFilter(
        target=request.agent_id,
        actor=request.actor,
        since=since,
        before_id=before_id,
        limit=request.page_size or DEFAULT_PAGE_SIZE,
    )


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    @unary
    async def ListAuditRecords(
        self, request: audit_pb2.ListAuditRecordsRequest, context: Context
    ) -> audit_pb2.ListAuditRecordsResponse:
        query = filter_from_pb(request)
        records = await self._trail.query(query)
        more = len(records) == query.limit and records and records[-1].id is not None
        next_token = str(records[-1].id) if more else ""
        return audit_pb2.ListAuditRecordsResponse(
            records=[record_to_pb(r) for r in records], next_page_token=next_token
        )
