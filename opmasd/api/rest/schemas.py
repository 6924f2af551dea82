"""JSON Schemas (OpenAPI 3.1) of protobuf messages in their canonical JSON mapping.

The form described is what json_format.MessageToDict(always_print_fields_with_no_presence=True)
writes and what ParseDict reads: lowerCamelCase json_name keys, 64-bit integers as strings,
enums by value name, bytes as base64, maps as objects, and the well-known types in their own
JSON forms (Duration "1.5s", Timestamp RFC 3339, FieldMask "a,b.c", Struct, Value, wrappers).
Every message becomes one component named by its full name; unknown keys are not allowed, as
the gateway rejects them. An unset message field may be null: grpc-gateway's marshaller (and so
ours) writes it so, and ParseDict reads null as unset.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from opmasd.api.rest.comments import Comments

JSON = dict[str, Any]
REF_PREFIX = "#/components/schemas/"
STATUS = "google.rpc.Status"
ANY = "google.protobuf.Any"

_F = FieldDescriptor
_INT32: JSON = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32: JSON = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64: JSON = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64: JSON = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_DOUBLE: JSON = {"type": "number", "format": "double"}
_FLOAT: JSON = {"type": "number", "format": "float"}
_BYTES: JSON = {"type": "string", "format": "byte", "contentEncoding": "base64"}

SCALARS: dict[int, JSON] = {
    _F.TYPE_DOUBLE: _DOUBLE,
    _F.TYPE_FLOAT: _FLOAT,
    _F.TYPE_INT32: _INT32,
    _F.TYPE_SINT32: _INT32,
    _F.TYPE_SFIXED32: _INT32,
    _F.TYPE_UINT32: _UINT32,
    _F.TYPE_FIXED32: _UINT32,
    _F.TYPE_INT64: _INT64,
    _F.TYPE_SINT64: _INT64,
    _F.TYPE_SFIXED64: _INT64,
    _F.TYPE_UINT64: _UINT64,
    _F.TYPE_FIXED64: _UINT64,
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: _BYTES,
}

# Well-known types with a JSON form of their own, inlined where used. The ones that are a single
# string, number or boolean can also be query and path parameters (QUERYABLE).
WELL_KNOWN: dict[str, JSON] = {
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": 'A duration: seconds with up to 9 decimals and the suffix "s", e.g. "1.5s".',
        "examples": ["10s", "0.250s"],
    },
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": 'An RFC 3339 time, e.g. "2024-05-01T12:00:00Z" (UTC is written with "Z").',
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": 'Field paths, comma-separated, in lowerCamelCase: "stopTimeout,resources.tasksMax".',
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.NullValue": {"type": "null"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.DoubleValue": _DOUBLE,
    "google.protobuf.FloatValue": _FLOAT,
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": _BYTES,
}
QUERYABLE = frozenset(
    n for n, s in WELL_KNOWN.items() if s.get("type") in ("string", "number", "integer", "boolean")
)

# Components that are not generated from a descriptor: the error body and the Any in its details.
FIXED: dict[str, JSON] = {
    ANY: {
        "type": "object",
        "description": 'A message of the type the "@type" URL names, its fields beside "@type", e.g. '
        '{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [...]}.',
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    STATUS: {
        "type": "object",
        "description": "An error, as google.rpc.Status in JSON; the HTTP status is grpc-gateway's for "
        "its code (INVALID_ARGUMENT 400, NOT_FOUND 404, ALREADY_EXISTS 409, UNAVAILABLE 503, ...).",
        "properties": {
            "code": {
                **_INT32,
                "description": "The gRPC status code (google.rpc.Code), e.g. 5 for NOT_FOUND.",
            },
            "message": {"type": "string", "description": "What went wrong, for people."},
            "details": {
                "type": "array",
                "items": {"$ref": REF_PREFIX + ANY},
                "description": "google.rpc error details: BadRequest (fieldViolations naming each bad "
                "field) for INVALID_ARGUMENT, ResourceInfo for NOT_FOUND and ALREADY_EXISTS.",
            },
        },
        "required": ["code", "message", "details"],
        "additionalProperties": False,
    },
}


def ref(name: str) -> JSON:
    return {"$ref": REF_PREFIX + name}


def _described(schema: JSON, text: str) -> JSON:
    return {**schema, "description": text} if text else schema


class SchemaSet:
    """The components/schemas of a document, filled as messages and enums are referred to."""

    def __init__(self, comments: Comments) -> None:
        self.comments = comments
        self.components: dict[str, JSON] = {}

    def message(self, message: Descriptor) -> JSON:
        """The schema of a message where it is used: a $ref, or the inline well-known form."""
        if message.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[message.full_name])
        if message.full_name == ANY:
            return self.fixed(ANY)
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # a placeholder, for recursive messages
            self.components[message.full_name] = self.object_schema(message)
        return ref(message.full_name)

    def fixed(self, name: str) -> JSON:
        """A $ref to one of FIXED (the error schema), adding it and what it refers to."""
        self.components.setdefault(name, FIXED[name])
        if name == STATUS:
            self.components.setdefault(ANY, FIXED[ANY])
        return ref(name)

    def enum(self, enum: EnumDescriptor) -> JSON:
        if enum.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[enum.full_name])
        if enum.full_name not in self.components:
            lines = [self.comments.of(enum.full_name)]
            for value in enum.values:
                text = self.comments.of(f"{enum.full_name}.{value.name}").replace("\n", " ")
                lines.append(f"- `{value.name}`" + (f": {text}" if text else ""))
            description = "\n".join(line for line in lines if line)
            schema = {"type": "string", "enum": [v.name for v in enum.values]}
            self.components[enum.full_name] = _described(schema, description)
        return ref(enum.full_name)

    def value(self, field: FieldDescriptor) -> JSON:
        """The schema of one value of the field (an element, for a repeated field)."""
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(SCALARS[field.type])

    def field(self, field: FieldDescriptor, omit: Collection[str] = ()) -> JSON:
        """The schema of the field as it appears in its message's JSON (omit: see object_schema)."""
        entry = field.message_type
        if entry is not None and field.is_repeated and entry.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.value(entry.fields_by_name["value"])}
        if omit and field.message_type is not None:
            element = self.object_schema(field.message_type, omit)
        else:
            element = self.value(field)
        return {"type": "array", "items": element} if field.is_repeated else element

    def object_schema(self, message: Descriptor, omit: Collection[str] = ()) -> JSON:
        """The message as an object schema; omit names fields (dotted for nested ones) to leave out,
        such as the fields a request's path binds."""
        real_oneofs = _real_oneofs(message)
        properties: JSON = {}
        for field in message.fields:
            if field.name in omit:
                continue
            nested = [p.split(".", 1)[1] for p in omit if p.startswith(field.name + ".")]
            text = self.comments.of(f"{message.full_name}.{field.name}")
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in real_oneofs:
                others = ", ".join(f.json_name for f in oneof.fields)
                text = f"{text}\n\nPart of oneof `{oneof.name}`: at most one of {others} is set.".strip()
            value = self.field(field, nested)
            if field.message_type is not None and not field.is_repeated and oneof is None:
                value = _nullable(value)  # the gateway writes an unset message field as null
            properties[field.json_name] = _described(value, text)
        schema: JSON = {"type": "object", "properties": properties, "additionalProperties": False}
        exclusive = [
            {"not": {"anyOf": [{"required": [a, b]} for i, a in enumerate(names) for b in names[i + 1 :]]}}
            for names in real_oneofs.values()
            if len(names) > 1
        ]
        if exclusive:
            schema["allOf"] = exclusive
        return _described(schema, self.comments.of(message.full_name))


def _nullable(schema: JSON) -> JSON:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    return schema  # no type: any value, null included


def _real_oneofs(message: Descriptor) -> dict[str, list[str]]:
    """The message's oneofs (not the synthetic ones of proto3 `optional`) → their members' json names."""
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    synthetic = {message.oneofs[f.oneof_index].name for f in proto.field if f.proto3_optional}
    return {o.name: [f.json_name for f in o.fields] for o in message.oneofs if o.name not in synthetic}
