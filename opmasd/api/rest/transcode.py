"""HTTP request → protobuf request message, and protobuf response → JSON, for one route.

The request message is built as grpc-gateway builds it: the body (all of it for `body: "*"`,
or one field), then the query string for every field the path and body do not bind, then the
path variables, which win. JSON ⇄ protobuf is json_format's canonical mapping; responses are
marshalled as grpc-gateway does by default (unpopulated fields emitted, lowerCamelCase names,
int64 as strings). Unknown fields are refused with a 400 naming them, where grpc-gateway
discards them: a misspelt field silently ignored is a setting that does not take effect.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from opmas.jsonmap import message_json
from opmasd.api.rest.rules import Route

# Well-known types whose JSON form is a string (or a scalar), so a query value can set them.
_STRING_FORM_TYPES = frozenset(
    {"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask"}
)
_WRAPPER_TYPES = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# ASCII digits only: int() and float() would also take "1_000", " 5" and other scripts' digits.
_INTEGER = re.compile(r"-?[0-9]{1,20}")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})


class BadRequest(Exception):
    """The HTTP request cannot become the method's request message; field names what is wrong."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is an error (protojson's rule), not a silent overwrite."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"the key {key[:64]!r} is given twice")
        document[key] = value
    return document


def parse_json(body: bytes) -> Any:
    """The body as JSON; BadRequest with the line and column of the first error."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("body", f"is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite, object_pairs_hook=_no_duplicates
        )
    except json.JSONDecodeError as exc:
        raise BadRequest("body", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:
        raise BadRequest("body", str(exc)) from None
    except RecursionError:
        raise BadRequest("body", "is nested too deeply") from None


def build_request(
    route: Route,
    message_class: type[Message],
    path_values: Mapping[str, str],
    query: Iterable[tuple[str, str]],
    body: bytes | None,
) -> Message:
    """The request message for route from the HTTP request's parts; raises BadRequest."""
    request = message_class()
    descriptor = cast(Descriptor, request.DESCRIPTOR)
    if route.body == "*":
        if body:
            document = parse_json(body)
            if not isinstance(document, dict):
                raise BadRequest("body", f"must be a JSON object of {descriptor.name} fields")
            _one_spelling(document, descriptor, "body")
            _parse_into(document, request, "body")
    elif route.body:
        if body:
            document = parse_json(body)
            field = descriptor.fields_by_name[route.body]
            _one_spelling({field.json_name: document}, descriptor, "body")
            _parse_into({field.json_name: document}, request, f"body ({route.body})")
    bound = set(path_values)
    if route.body and route.body != "*":
        bound.add(route.body)
    # One parameter at a time, so that an error names the parameter as it was sent.
    for key, value in _query_values(descriptor, route, bound, query):
        _parse_into(value, request, key)
    if path_values:
        overrides = message_class()
        nested: dict[str, Any] = {}
        for field_path, text in path_values.items():
            leaf = _field_at(descriptor, field_path, "path")
            _put(nested, [f.name for f in leaf], _coerce(leaf[-1], [text], f"path variable {field_path}"))
            _clear(request, [f.name for f in leaf])
        _parse_into(nested, overrides, "path")
        request.MergeFrom(overrides)
    return request


def _query_values(
    descriptor: Descriptor, route: Route, bound: set[str], query: Iterable[tuple[str, str]]
) -> list[tuple[str, dict[str, Any]]]:
    """Each query parameter (repeated keys gathered) as the nested JSON value of its field."""
    # Gathered by the field a key names, so that "page_size" and "pageSize" are one field.
    grouped: dict[str, tuple[str, list[FieldDescriptor], list[str]]] = {}
    for key, text in query:
        if route.body == "*":
            raise BadRequest(key, f"not accepted: {route.method.name} takes every field in its body")
        fields = _field_at(descriptor, key, f"query parameter {key}")
        proto_path = ".".join(f.name for f in fields)
        first_key, _, texts = grouped.setdefault(proto_path, (key, fields, []))
        if first_key != key:
            raise BadRequest(key, f"names the same field as {first_key!r}; give it once")
        texts.append(text)
    out: list[tuple[str, dict[str, Any]]] = []
    for proto_path, (key, path, texts) in grouped.items():
        where = f"query parameter {key}"
        if any(proto_path == b or proto_path.startswith(b + ".") for b in bound):
            raise BadRequest(key, "is already given by the path or the body")
        value: dict[str, Any] = {}
        _put(value, [f.name for f in path], _coerce(path[-1], texts, where))
        out.append((key, value))
    return out


def _field_at(descriptor: Descriptor, dotted: str, where: str) -> list[FieldDescriptor]:
    """The fields along a dotted path (proto or JSON names at each step)."""
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for name in dotted.split("."):
        if current is None:
            raise BadRequest(dotted, f"{where}: {fields[-1].name!r} has no fields")
        by_json = {f.json_name: f for f in current.fields}
        field = current.fields_by_name.get(name) or by_json.get(name)
        if field is None:
            raise BadRequest(dotted, f"{where}: {current.full_name} has no field {name!r}")
        fields.append(field)
        is_value_type = field.message_type is not None and (
            field.message_type.full_name in _STRING_FORM_TYPES | _WRAPPER_TYPES
        )
        current = field.message_type if field.message_type is not None and not is_value_type else None
    if fields[-1].message_type is not None and current is not None:
        raise BadRequest(dotted, f"{where}: {fields[-1].name!r} is a message; name one of its fields")
    if any(f.is_repeated for f in fields[:-1]):
        raise BadRequest(dotted, f"{where}: a field inside a repeated message cannot be set this way")
    return fields


def _coerce(field: FieldDescriptor, texts: list[str], where: str) -> Any:
    """Query or path text as the JSON value json_format expects for this field."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        raise BadRequest(field.name, f"{where}: a map cannot be set from the query string")
    if not field.is_repeated and len(texts) > 1:
        raise BadRequest(field.name, f"{where}: given {len(texts)} times; it takes one value")
    values = [_scalar(field, text, where) for text in texts]
    return values if field.is_repeated else values[0]


def _scalar(field: FieldDescriptor, text: str, where: str) -> Any:
    kind = field.type
    if field.message_type is not None:
        full_name = field.message_type.full_name
        if full_name in _WRAPPER_TYPES:
            return _scalar(field.message_type.fields_by_name["value"], text, where)
        return text  # Duration "1.5s", Timestamp RFC 3339, FieldMask "a,b": their JSON forms
    if kind == FieldDescriptor.TYPE_BOOL:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise BadRequest(field.name, f"{where}: {text[:64]!r} is not true or false")
    if kind in _INTEGER_TYPES:
        if not _INTEGER.fullmatch(text):
            raise BadRequest(field.name, f"{where}: {text[:64]!r} is not an integer")
        return int(text)
    if kind in _FLOAT_TYPES:
        if not _DECIMAL.fullmatch(text) or not math.isfinite(float(text)):
            raise BadRequest(field.name, f"{where}: {text[:64]!r} is not a finite number")
        return float(text)
    if kind == FieldDescriptor.TYPE_ENUM:
        if _INTEGER.fullmatch(text):
            return int(text)
        known = field.enum_type.values_by_name if field.enum_type is not None else {}
        if text not in known:
            names = ", ".join(known)
            raise BadRequest(field.name, f"{where}: {text[:64]!r} is not one of {names}")
        return text
    return text


def _put(target: dict[str, Any], path: list[str], value: Any) -> None:
    for name in path[:-1]:
        target = target.setdefault(name, {})
    target[path[-1]] = value


def _clear(message: Message, path: list[str]) -> None:
    for name in path[:-1]:
        if not message.HasField(name):
            return
        message = getattr(message, name)
    message.ClearField(path[-1])


def _one_spelling(document: dict[str, Any], descriptor: Any, where: str) -> None:
    """Refuse a field given under both of its names ("agentId" and "agent_id"): json_format
    would keep one of the two without a word."""
    named: dict[str, str] = {}
    for key, value in document.items():
        field = descriptor.fields_by_name.get(key) or next(
            (f for f in descriptor.fields if f.json_name == key), None
        )
        if field is None:
            continue  # json_format names unknown fields itself
        if field.name in named:
            raise BadRequest(where, f"{named[field.name]!r} and {key!r} are the same field; give it once")
        named[field.name] = key
        if field.message_type is None or field.message_type.full_name.startswith("google.protobuf."):
            continue
        if field.message_type.GetOptions().map_entry:
            continue
        items = value if field.is_repeated and isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                _one_spelling(item, field.message_type, f"{where}.{key}")


def _parse_into(document: dict[str, Any], message: Message, where: str) -> None:
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        # json_format lists every available field after its message; the first line says it.
        raise BadRequest(where, str(exc).split("\n", 1)[0].strip()) from None
    except RecursionError:
        raise BadRequest(where, "is nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise BadRequest(where, str(exc)[:300]) from None


def response_json(route: Route, response: Message) -> Any:
    """The JSON value of the response (or of its response_body field), as grpc-gateway writes it."""
    document = message_json(response)
    if route.response_body:
        field = response.DESCRIPTOR.fields_by_name[route.response_body]
        return document.get(field.json_name)
    return document
