"""The REST routes of a gRPC service, read from the google.api.http options of its descriptors.

Each annotated method gives one Route per binding (its own rule and each additional_binding).
Nothing here is written per method: a service with new annotated methods gets new routes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from opmasd.api.rest.templates import PathTemplate, TemplateError, parse_template


@dataclass(frozen=True)
class Route:
    http_method: str  # "GET", "POST", ... (custom verbs keep their own name, upper-cased)
    template: PathTemplate
    # "" (no body), "*" (the whole request message) or the name of one request field.
    body: str
    # "" (the whole response message) or the name of one response field.
    response_body: str
    method: MethodDescriptor

    @property
    def grpc_path(self) -> str:
        """The gRPC method path, "/package.Service/Method"."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def specificity(self) -> tuple[int, int]:
        """Sort key: more literal segments first, then fewer segments (a '**' is least specific)."""
        wild = sum(1 for s in self.template.segments if s.kind == "**")
        return (-self.template.literal_count, wild)


# Well-known types have scalar JSON forms (Duration "1s", wrappers): a path variable may set them.
_WKT = "google.protobuf."


class RuleError(ValueError):
    """An http rule that cannot be served; the message names the method and what is wrong."""


def routes_of(services: Iterable[ServiceDescriptor]) -> list[Route]:
    """Every route of the services' annotated methods, most specific first."""
    routes: list[Route] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                routes.append(_route(method, binding))
    routes.sort(key=lambda r: r.specificity)
    return routes


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    where = f"{method.full_name}"
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise RuleError(f"{where}: http rule has no pattern")
    if kind == "custom":
        verb, path = rule.custom.kind.upper(), rule.custom.path
    else:
        verb, path = kind.upper(), getattr(rule, kind)
    if method.client_streaming:
        raise RuleError(f"{where}: client-streaming methods cannot be served over REST")
    try:
        template = parse_template(path)
    except TemplateError as exc:
        raise RuleError(f"{where}: {exc}") from None
    request = method.input_type
    for variable in template.variables:
        _leaf(request, variable, f"{where}: path variable {variable!r}")
    if rule.body not in ("", "*") and rule.body not in request.fields_by_name:
        raise RuleError(f"{where}: body {rule.body!r} is not a field of {request.full_name}")
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise RuleError(
            f"{where}: response_body {rule.response_body!r} is not a field of {method.output_type.full_name}"
        )
    return Route(verb, template, rule.body, rule.response_body, method)


def _leaf(message: object, field_path: str, where: str) -> None:
    """Check that field_path names a non-repeated scalar field of the message (for a path variable)."""
    descriptor = message
    parts = field_path.split(".")
    for depth, name in enumerate(parts):
        fields = getattr(descriptor, "fields_by_name", {})
        if name not in fields:
            raise RuleError(f"{where} names no field of the request")
        field = fields[name]
        if field.is_repeated:
            raise RuleError(f"{where} is a repeated field")
        if depth < len(parts) - 1:
            if field.message_type is None:
                raise RuleError(f"{where}: {name!r} is not a message")
            descriptor = field.message_type
        elif field.message_type is not None and not field.message_type.full_name.startswith(
            "google.protobuf."
        ):
            raise RuleError(f"{where} is a message, not a value")
