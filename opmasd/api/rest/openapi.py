"""The OpenAPI 3.1 document of the REST routes, generated at run time from the same descriptors.

Paths and operations come from the routes (rules.routes_of), schemas from the messages
(schemas.SchemaSet), descriptions from the proto's comments (comments.Comments): an annotated
RPC added to a proto appears here as it appears in the gateway, with nothing written per method.
Parameter names are proto field paths (`agent_id`, `book.name`), as the gateway reads them;
bodies use the json names (`agentId`) that the gateway writes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from opmasd.api.rest.comments import Comments
from opmasd.api.rest.rules import Route
from opmasd.api.rest.schemas import JSON, QUERYABLE, STATUS, WELL_KNOWN, SchemaSet, ref
from opmasd.api.rest.templates import PathTemplate, Segment

OPENAPI_VERSION = "3.1.0"
JSON_MEDIA = "application/json"
NDJSON_MEDIA = "application/x-ndjson"
# The gateway takes a missing body as the empty message (as grpc-gateway does), so a body is optional.
BODY_REQUIRED = False
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

INTRO = (
    "Bodies and responses are protobuf's canonical JSON mapping: lowerCamelCase field names "
    "(the proto names are accepted too), 64-bit integers as strings, enums by name, durations "
    'as "1.5s", times in RFC 3339. Fields at their default value are written all the same; '
    "unknown fields in a request are an error (400). Path and query parameters are named by "
    "proto field paths; nested fields as `a.b`, a repeated field by repeating the key. Errors are "
    "google.rpc.Status objects. Server-streaming methods answer newline-delimited JSON, one "
    '{"result": ...} per message and {"error": ...} if the stream fails.'
)


def openapi_document(
    routes: list[Route],
    title: str,
    version: str,
    descriptor_set: descriptor_pb2.FileDescriptorSet | None,
) -> JSON:
    """The document for routes; descriptions come from descriptor_set's comments when it has them."""
    comments = Comments(descriptor_set)
    schemas = SchemaSet(comments)
    paths: dict[str, JSON] = {}
    tags: dict[str, str] = {}
    clashing = _clashing_names(routes)
    for route in routes:
        verb = route.http_method.lower()
        if verb not in _HTTP_METHODS:
            continue  # a custom kind OpenAPI 3.1 has no operation for
        path, patterns = openapi_path(route.template)
        item = paths.setdefault(path, {})
        if verb in item:
            continue  # routes are most specific first: the gateway serves the first one too
        service = route.method.containing_service
        tags.setdefault(service.name, comments.of(service.full_name))
        item[verb] = _operation(route, schemas, patterns, _operation_id(route, clashing))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": INTRO},
        "tags": [
            {"name": name, "description": text} if text else {"name": name} for name, text in tags.items()
        ],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.components.items()))},
    }


def openapi_path(template: PathTemplate) -> tuple[str, dict[str, str]]:
    """The OpenAPI path of a template ("/v1/{book.name}:publish") and, for each variable that is
    not a single segment, the regular expression its value must match."""
    parts: list[str] = []
    patterns: dict[str, str] = {}
    segments = list(template.segments)
    anonymous = 0
    while segments:
        segment = segments.pop(0)
        if segment.variable:
            group = [segment]
            while segments and segments[0].variable == segment.variable:
                group.append(segments.pop(0))
            parts.append("{" + segment.variable + "}")
            if [s.kind for s in group] != ["*"]:
                patterns[segment.variable] = _regex(group)
        elif segment.kind == "literal":
            parts.append(segment.text)
        else:
            anonymous += 1
            parts.append("{" + f"_{anonymous}" + "}")
            patterns[f"_{anonymous}"] = _regex([segment])
    return "/" + "/".join(parts) + (f":{template.verb}" if template.verb else ""), patterns


def _regex(group: list[Segment]) -> str:
    """ "*" is one segment; "**" (always last) is zero or more, so "a/**" matches "a" too."""
    out = ""
    for position, segment in enumerate(group):
        if segment.kind == "**":
            out += "(/.*)?" if position else ".*"
        else:
            out += ("/" if position else "") + ("[^/]+" if segment.kind == "*" else re.escape(segment.text))
    return f"^{out}$"


def _operation(route: Route, schemas: SchemaSet, patterns: dict[str, str], operation_id: str) -> JSON:
    method, comments = route.method, schemas.comments
    operation: JSON = {"operationId": operation_id, "tags": [method.containing_service.name]}
    text = comments.of(method.full_name)
    if text:
        operation["summary"] = _first_paragraph(text)
        if operation["summary"] != text:
            operation["description"] = text
    parameters = _path_parameters(route, schemas, patterns)
    if route.body != "*":
        bound = {*route.template.variables, route.body} - {""}
        parameters += _query_parameters(method.input_type, bound, schemas)
    if parameters:
        operation["parameters"] = parameters
    if route.body:
        operation["requestBody"] = {
            "required": BODY_REQUIRED,
            "content": {JSON_MEDIA: {"schema": _body_schema(route, schemas)}},
        }
    operation["responses"] = {
        "200": _response(route, schemas),
        "default": {
            "description": "An error: a google.rpc.Status, with the HTTP status of its code.",
            "content": {JSON_MEDIA: {"schema": schemas.fixed(STATUS)}},
        },
    }
    return operation


def _path_parameters(route: Route, schemas: SchemaSet, patterns: dict[str, str]) -> list[JSON]:
    out: list[JSON] = []
    for name, pattern in patterns.items():
        if name not in route.template.variables:  # an anonymous wildcard, "_1"
            schema: JSON = {"type": "string", "pattern": pattern}
            out.append(_parameter(name, "path", schema, "Any path segment; not bound to a field."))
    for variable in route.template.variables:
        field = _field_at(route.method.input_type, variable)
        schema = schemas.value(field)
        text = _field_comment(field, schemas.comments)
        if variable in patterns:
            schema = {**schema, "pattern": patterns[variable]}
            text = (
                f"{text}\n\nA value of the form `{_form(route.template, variable)}`, its slashes unencoded."
            )
        out.append(_parameter(variable, "path", schema, text.strip()))
    return out


def _query_parameters(
    message: Descriptor,
    bound: Collection[str],
    schemas: SchemaSet,
    prefix: str = "",
    seen: frozenset[str] = frozenset(),
) -> list[JSON]:
    """Every field not bound by the path or the body, nested ones by dotted names (grpc-gateway's
    query mapping). Maps, repeated messages and the JSON-valued well-known types have no query form."""
    out: list[JSON] = []
    ancestors = seen | {message.full_name}
    for field in message.fields:
        name = prefix + field.name
        sub = field.message_type
        if name in bound or (sub is not None and field.is_repeated):
            continue
        if sub is not None and sub.full_name not in QUERYABLE:
            if sub.full_name not in WELL_KNOWN and sub.full_name not in ancestors:
                out += _query_parameters(sub, bound, schemas, name + ".", ancestors)
            continue
        schema = schemas.value(field)
        text = _field_comment(field, schemas.comments)
        if field.is_repeated:
            parameter = _parameter(name, "query", {"type": "array", "items": schema}, text)
            out.append({**parameter, "style": "form", "explode": True})
        else:
            out.append(_parameter(name, "query", schema, text))
    return out


def _body_schema(route: Route, schemas: SchemaSet) -> JSON:
    """The request message (body "*") or one of its fields, without the fields the path binds."""
    request, bound = route.method.input_type, route.template.variables
    if route.body == "*":
        return schemas.object_schema(request, bound) if bound else schemas.message(request)
    field = request.fields_by_name[route.body]
    nested = [v.split(".", 1)[1] for v in bound if v.startswith(route.body + ".")]
    return _described(schemas.field(field, nested), _field_comment(field, schemas.comments))


def _response(route: Route, schemas: SchemaSet) -> JSON:
    output = route.method.output_type
    if route.response_body:
        field = output.fields_by_name[route.response_body]
        schema = _described(schemas.field(field), _field_comment(field, schemas.comments))
        what = f"The {route.response_body} of {output.full_name}"
    else:
        schema, what = schemas.message(output), output.full_name
    if not route.server_streaming:
        text = _first_paragraph(schemas.comments.of(output.full_name)) if not route.response_body else ""
        return {"description": text or what, "content": {JSON_MEDIA: {"schema": schema}}}
    line = {
        "title": f"Stream result of {what}",
        "type": "object",
        "properties": {"result": schema, "error": ref(STATUS)},
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
    }
    schemas.fixed(STATUS)
    description = f"A stream of {what}: one JSON object per line, the last an error if the stream fails."
    return {"description": description, "content": {NDJSON_MEDIA: {"schema": line}}}


def _operation_id(route: Route, clashing: Collection[str]) -> str:
    """The method's name (with its service's when another service has the same method name);
    an additional binding adds its position: "GetBook_2"."""
    method = route.method
    name = f"{method.containing_service.name}_{method.name}" if method.name in clashing else method.name
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    for index, binding in enumerate((rule, *rule.additional_bindings)):
        kind = binding.WhichOneof("pattern")
        if kind is None:
            continue
        verb, path = (
            (binding.custom.kind, binding.custom.path) if kind == "custom" else (kind, getattr(binding, kind))
        )
        if (verb.upper(), path, binding.body) == (route.http_method, route.template.source, route.body):
            return name if index == 0 else f"{name}_{index + 1}"
    return name


def _clashing_names(routes: Iterable[Route]) -> set[str]:
    services = {r.method.containing_service.full_name: r.method.containing_service for r in routes}
    counts = Counter(m.name for s in services.values() for m in s.methods)
    return {name for name, count in counts.items() if count > 1}


def _field_at(message: Descriptor, path: str) -> FieldDescriptor:
    """The field a dotted path names (rules.py has checked that it exists)."""
    *parents, leaf = path.split(".")
    for name in parents:
        nested = message.fields_by_name[name].message_type
        assert nested is not None
        message = nested
    return message.fields_by_name[leaf]


def _field_comment(field: FieldDescriptor, comments: Comments) -> str:
    return comments.of(field.full_name)


def _form(template: PathTemplate, variable: str) -> str:
    return "/".join(s.text or s.kind for s in template.segments if s.variable == variable)


def _parameter(name: str, where: str, schema: JSON, description: str) -> JSON:
    parameter: JSON = {"name": name, "in": where, "required": where == "path", "schema": schema}
    return _described(parameter, description)


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n", 1)[0].split())


def _described(item: JSON, text: str) -> JSON:
    return {**item, "description": text} if text else item
