"""The proto's comments by full name, read from a FileDescriptorSet built with source info.

Generated Python keeps no source_code_info, so scripts/gen_proto.py writes the set beside the
stubs (opmas/v1/agents.binpb). Keys are full names: "pkg.Message", "pkg.Message.field",
"pkg.Message.oneof", "pkg.Enum", "pkg.Enum.VALUE", "pkg.Service", "pkg.Service.Method".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources

from google.protobuf import descriptor_pb2

# descriptor.proto's field numbers, which make up the paths of source_code_info locations.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SERVICES = 4, 5, 6
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS, _MESSAGE_ONEOFS = 2, 3, 4, 8
_ENUM_VALUES = 2
_SERVICE_METHODS = 2

Path = tuple[int, ...]


def load_descriptor_set(package: str = "opmas.v1") -> descriptor_pb2.FileDescriptorSet | None:
    """The package's *.binpb files as one set (each file once); None when it ships none."""
    merged = descriptor_pb2.FileDescriptorSet()
    names: set[str] = set()
    for entry in sorted(resources.files(package).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".binpb"):
            continue
        for file in descriptor_pb2.FileDescriptorSet.FromString(entry.read_bytes()).file:
            if file.name not in names:
                names.add(file.name)
                merged.file.append(file)
    return merged if names else None


def _clean(text: str) -> str:
    """A comment as protoc keeps it (" line\\n line\\n") as plain text, paragraphs kept."""
    lines = [line[1:] if line.startswith(" ") else line for line in text.splitlines()]
    return "\n".join(line.rstrip() for line in lines).strip()


class Comments:
    """Look-up of comments; every name without one (or without a set at all) gives ""."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet | None) -> None:
        self._text: dict[str, str] = {}
        for file in descriptor_set.file if descriptor_set is not None else ():
            self._read_file(file)

    def of(self, full_name: str) -> str:
        return self._text.get(full_name, "")

    def __len__(self) -> int:
        return len(self._text)

    def _read_file(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        at: dict[Path, str] = {}
        for loc in file.source_code_info.location:
            parts = [_clean(loc.leading_comments), _clean(loc.trailing_comments)]
            text = "\n\n".join(p for p in parts if p)
            if text:
                at[tuple(loc.path)] = text
        scope = file.package
        self._messages(at, scope, file.message_type, (_FILE_MESSAGES,))
        self._enums(at, scope, file.enum_type, (_FILE_ENUMS,))
        for i, service in enumerate(file.service):
            name = _join(scope, service.name)
            self._put(at, (_FILE_SERVICES, i), name)
            for j, method in enumerate(service.method):
                self._put(at, (_FILE_SERVICES, i, _SERVICE_METHODS, j), f"{name}.{method.name}")

    def _messages(
        self, at: dict[Path, str], scope: str, messages: Sequence[descriptor_pb2.DescriptorProto], path: Path
    ) -> None:
        for i, message in enumerate(messages):
            here, name = (*path, i), _join(scope, message.name)
            self._put(at, here, name)
            self._names(at, name, (f.name for f in message.field), (*here, _MESSAGE_FIELDS))
            self._names(at, name, (o.name for o in message.oneof_decl), (*here, _MESSAGE_ONEOFS))
            self._messages(at, name, message.nested_type, (*here, _MESSAGE_NESTED))
            self._enums(at, name, message.enum_type, (*here, _MESSAGE_ENUMS))

    def _enums(
        self,
        at: dict[Path, str],
        scope: str,
        enums: Sequence[descriptor_pb2.EnumDescriptorProto],
        path: Path,
    ) -> None:
        for i, enum in enumerate(enums):
            name = _join(scope, enum.name)
            self._put(at, (*path, i), name)
            self._names(at, name, (v.name for v in enum.value), (*path, i, _ENUM_VALUES))

    def _names(self, at: dict[Path, str], scope: str, names: Iterable[str], path: Path) -> None:
        for i, name in enumerate(names):
            self._put(at, (*path, i), f"{scope}.{name}")

    def _put(self, at: dict[Path, str], path: Path, name: str) -> None:
        if path in at:
            self._text[name] = at[path]


def _join(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name
