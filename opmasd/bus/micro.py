"""NATS micro service registration: opmasd answers $SRV.PING, $SRV.INFO and $SRV.STATS.

The service's endpoints are the request handlers themselves (the manager's command and query
subjects), so `nats micro ls` / `nats micro info opmasd` list them and count their requests.
micro runs an endpoint's handler inline in its subscription; ours only hands the request to a
RequestRunner, so one slow command does not hold the others. Micro's own processing time is
therefore not meaningful; the STATS `data` of each endpoint carries the runner's counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from opmasd.bus.registration import Registration, Teardown
from opmasd.bus.serving import RequestRunner

log = structlog.get_logger(__name__)

DEFAULT_QUEUE = "opmasd"


# Takes a request's payload and its "Authorization" header ("" when it has none).
EndpointHandler = Callable[[bytes, str], Awaitable[bytes | None]]
# A longer header is not a credential of ours: it is cut here, before anything reads it.
MAX_AUTHORIZATION = 1024


@dataclass(frozen=True)
class ServiceEndpoint:
    name: str  # [A-Za-z0-9_-]+, shown by `nats micro info`
    subject: str
    handler: EndpointHandler
    # Several opmasd nodes on one NATS share the manager subjects: one of them answers.
    queue: str = DEFAULT_QUEUE


@dataclass(frozen=True)
class ServiceDescription:
    name: str
    version: str
    description: str = ""
    metadata: Mapping[str, str] | None = None


def service_registration(
    desc: ServiceDescription,
    endpoints: Sequence[ServiceEndpoint],
    on_stop: Callable[[Registration], None] | None = None,
) -> Registration:
    """The service as a Registration: registered on connect, its requests run by one runner."""
    runner = RequestRunner(desc.name)

    async def setup(nc: Client) -> Teardown:
        service = await start_service(nc, runner, desc, endpoints)
        return service.stop

    return Registration(f"service {desc.name}", setup, runner, on_stop)


async def start_service(
    nc: Client, runner: RequestRunner, desc: ServiceDescription, endpoints: Sequence[ServiceEndpoint]
) -> Service:
    def stats_data(stats: EndpointStats) -> dict[str, Any]:
        return {
            "handled": runner.handled[stats.subject],
            "failed": runner.failed[stats.subject],
            "in_flight": runner.in_flight,
        }

    service = await add_service(
        nc,
        name=desc.name,
        version=desc.version,
        description=desc.description or None,
        metadata=dict(desc.metadata or {}),
        stats_handler=stats_data,
    )
    try:
        for endpoint in endpoints:
            await service.add_endpoint(
                name=endpoint.name,
                subject=endpoint.subject,
                queue_group=endpoint.queue,
                handler=_micro_handler(runner, endpoint),
            )
    except BaseException:
        await service.stop()
        raise
    log.info(
        "nats micro service registered",
        service=desc.name,
        id=service.id,
        endpoints=[e.subject for e in endpoints],
    )
    return service


def _micro_handler(runner: RequestRunner, endpoint: ServiceEndpoint) -> Any:
    async def handle(request: Request) -> None:
        # Never raises: micro would answer an exception with a 500 header reply, or raise
        # into nats-py when there is no reply subject.
        reply = request.respond if request._msg.reply else None
        authorization = _authorization(request.headers)

        async def handler(data: bytes) -> bytes | None:
            return await endpoint.handler(data, authorization)

        await runner.dispatch(endpoint.subject, request.data, handler, reply)

    return handle


def _authorization(headers: Mapping[str, str] | None) -> str:
    for key, value in (headers or {}).items():
        if key.lower() == "authorization":
            return value[:MAX_AUTHORIZATION]
    return ""
