"""The JSON form of the API's messages: the proto3 JSON mapping exactly as opmasd's REST API writes it.

lowerCamelCase field names, enum values by name (AGENT_STATE_RUNNING), Durations as "1.5s",
Timestamps as RFC 3339, 64-bit integers as strings; every field present, those without
presence at their default value and an unset message field as null (what grpc-gateway's
protojson EmitUnpopulated writes). A client that prints JSON (opmasctl -o json) uses this, so a
script reads the same document whichever of curl and opmasctl fetched it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = ["message_json"]


def message_json(message: Message) -> dict[str, Any]:
    """MessageToDict with every field present, unset message fields as null."""
    document = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    _fill_unset(message.DESCRIPTOR, document)
    return document


def _fill_unset(descriptor: Any, document: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.containing_oneof is not None or field.message_type is None:
            continue
        if field.message_type.full_name.startswith("google.protobuf."):
            # Well-known types (Timestamp, Duration, Struct, Value) have their own JSON forms.
            if field.json_name not in document and not field.is_repeated:
                document[field.json_name] = None
            continue
        value = document.get(field.json_name)
        if field.message_type.GetOptions().map_entry:
            entry_value = field.message_type.fields_by_name["value"]
            if isinstance(value, dict) and entry_value.message_type is not None:
                for item in value.values():
                    if isinstance(item, dict):
                        _fill_unset(entry_value.message_type, item)
        elif field.is_repeated:
            for item in value or ():
                if isinstance(item, dict):
                    _fill_unset(field.message_type, item)
        elif value is None:
            document[field.json_name] = None
        elif isinstance(value, dict):
            _fill_unset(field.message_type, value)
