"""google.api.http path templates: parsing "/v1/{name=shelves/*}/books:verb" and matching paths.

The grammar (google/api/http.proto):

    Template = "/" Segments [ Verb ] ;   Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;   Verb = ":" LITERAL ;

`{x}` is `{x=*}`: one segment. `**` matches the rest of the path and must come last. Values are
percent-decoded; a single-segment value never holds a "/" unless it was sent encoded (%2F).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LITERAL = re.compile(r"^[^/*{}=:]+$")


class TemplateError(ValueError):
    """A google.api.http path template that does not follow the grammar."""


@dataclass(frozen=True)
class Segment:
    # "literal", "*" (one segment) or "**" (the rest of the path)
    kind: str
    text: str = ""
    # The field path of the variable this segment belongs to, or "".
    variable: str = ""


@dataclass(frozen=True)
class PathTemplate:
    source: str
    segments: tuple[Segment, ...]
    verb: str

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.variable for s in self.segments if s.variable))

    @property
    def literal_count(self) -> int:
        return sum(1 for s in self.segments if s.kind == "literal")

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The variables' decoded values when raw_path (still percent-encoded) matches, else None."""
        if not raw_path.startswith("/"):
            return None
        path = raw_path[1:]
        if self.verb:
            suffix = ":" + self.verb
            if not path.endswith(suffix):
                return None
            path = path[: -len(suffix)]
        parts = path.split("/")
        values: dict[str, list[str]] = {}
        index = 0
        for segment in self.segments:
            if segment.kind == "**":
                rest = parts[index:]
                if segment.variable:
                    values.setdefault(segment.variable, []).extend(unquote(p) for p in rest)
                index = len(parts)
                break
            if index >= len(parts) or parts[index] == "":
                return None
            part = unquote(parts[index])
            if segment.kind == "literal" and part != segment.text:
                return None
            if segment.variable:
                values.setdefault(segment.variable, []).append(part)
            index += 1
        if index != len(parts):
            return None
        return {name: "/".join(pieces) for name, pieces in values.items()}


def parse_template(source: str) -> PathTemplate:
    """Parse a template; raises TemplateError naming what is wrong."""
    if not source.startswith("/"):
        raise TemplateError(f"path template {source!r} must start with '/'")
    body, verb = source[1:], ""
    # The verb is a ':' after the last '/' and outside any {...}.
    close = body.rfind("}")
    colon = body.rfind(":")
    if colon > body.rfind("/") and colon > close:
        body, verb = body[:colon], body[colon + 1 :]
        if not _LITERAL.match(verb):
            raise TemplateError(f"path template {source!r}: bad verb {verb!r}")
    segments: list[Segment] = []
    for token in _split_top(body, source):
        if token.startswith("{"):
            if not token.endswith("}"):
                raise TemplateError(f"path template {source!r}: unclosed variable {token!r}")
            inner = token[1:-1]
            name, sep, pattern = inner.partition("=")
            if not _FIELD_PATH.match(name):
                raise TemplateError(f"path template {source!r}: bad field path {name!r}")
            for sub in (pattern if sep else "*").split("/"):
                segments.append(_plain(sub, source, variable=name))
        else:
            segments.append(_plain(token, source))
    for position, segment in enumerate(segments):
        if segment.kind == "**" and position != len(segments) - 1:
            raise TemplateError(f"path template {source!r}: '**' must be the last segment")
    names = [s.variable for s in segments if s.variable]
    runs = [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]
    if len(runs) != len(set(runs)):
        raise TemplateError(f"path template {source!r}: a variable appears twice")
    return PathTemplate(source, tuple(segments), verb)


def _split_top(body: str, source: str) -> list[str]:
    """Split on the '/' that are not inside {...}."""
    tokens, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
            if depth > 1:
                raise TemplateError(f"path template {source!r}: nested variables")
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError(f"path template {source!r}: unbalanced '}}'")
        elif char == "/" and depth == 0:
            tokens.append(body[start:i])
            start = i + 1
    if depth:
        raise TemplateError(f"path template {source!r}: unclosed variable")
    tokens.append(body[start:])
    if any(t == "" for t in tokens):
        raise TemplateError(f"path template {source!r}: empty segment")
    return tokens


def _plain(token: str, source: str, variable: str = "") -> Segment:
    if token in ("*", "**"):
        return Segment(token, variable=variable)
    if not _LITERAL.match(token):
        raise TemplateError(f"path template {source!r}: bad segment {token!r}")
    return Segment("literal", token, variable)
