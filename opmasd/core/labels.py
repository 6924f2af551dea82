"""Agent labels and label selectors: Kubernetes' grammar for both, so `-l env=prod,role!=probe`
means here what it means to kubectl.

A label key is an optional DNS-subdomain prefix and a slash, then a name of 1-63 characters of
letters, digits, '-', '_' and '.', beginning and ending with a letter or digit; a value is
empty or follows the name's rule. A selector is a comma-separated list of requirements, all of
which must hold: `k=v` (or `k==v`), `k!=v` (true, too, when the label is absent), `k in (a,b)`,
`k notin (a,b)`, `k` (present) and `!k` (absent).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from opmasd.core.errors import InvalidArgument

MAX_LABELS = 64
MAX_NAME_LENGTH = 63
MAX_PREFIX_LENGTH = 253
MAX_SELECTOR_LENGTH = 4096

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "…")


def label_key_error(key: str) -> str | None:
    """Why key is not a valid label key, or None."""
    prefix, slash, name = key.rpartition("/")
    if not name:
        return f"key {_shown(key)} has an empty name"
    if slash:
        if not prefix or len(prefix) > MAX_PREFIX_LENGTH or not _PREFIX.match(prefix):
            return (
                f"key {_shown(key)}: the prefix must be a DNS subdomain of at most "
                f"{MAX_PREFIX_LENGTH} characters"
            )
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        return (
            f"key {_shown(key)}: a name is 1-{MAX_NAME_LENGTH} characters of letters, digits, '-', '_', "
            "'.', beginning and ending with a letter or digit"
        )
    return None


def label_value_error(key: str, value: str) -> str | None:
    """Why value is not a valid value (of key), or None."""
    if value == "":
        return None
    if len(value) > MAX_NAME_LENGTH or not _NAME.match(value):
        return (
            f"value {_shown(value)} of {_shown(key)}: a value is empty or 1-{MAX_NAME_LENGTH} characters "
            "of letters, digits, '-', '_', '.', beginning and ending with a letter or digit"
        )
    return None


def label_errors(labels: Mapping[str, str]) -> list[str]:
    """Everything wrong with a set of labels (empty when valid)."""
    errors: list[str] = []
    if len(labels) > MAX_LABELS:
        errors.append(f"has {len(labels)} labels; at most {MAX_LABELS}")
        return errors
    for key, value in labels.items():
        problem = label_key_error(key) or label_value_error(key, value)
        if problem:
            errors.append(problem)
    return errors


Operator = Literal["=", "!=", "in", "notin", "exists", "!"]


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "exists":
            return value is not None
        if self.operator == "!":
            return value is None
        if self.operator in ("=", "in"):
            return value is not None and value in self.values
        # != and notin, as Kubernetes has them: an agent without the label matches.
        return value is None or value not in self.values


@dataclass(frozen=True)
class Selector:
    """A parsed label selector; the empty selector matches every agent."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


class SelectorError(ValueError):
    """A selector that does not parse; the message names the part that is wrong."""


_KEY = r"[^\s=!,()<>]+"
_EQUALITY = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*([^\s=!,()]*)\s*$")
_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\((.*)\)\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


def _split(text: str) -> list[str]:
    """The requirements: commas at parenthesis depth 0 separate them."""
    parts: list[str] = []
    depth = 0
    start = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
            if depth > 1:
                raise SelectorError("nested parentheses")
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError("a ')' without its '('")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise SelectorError("a '(' without its ')'")
    parts.append(text[start:])
    return parts


def _checked_key(key: str) -> str:
    problem = label_key_error(key)
    if problem:
        raise SelectorError(problem)
    return key


def _checked_value(key: str, value: str) -> str:
    problem = label_value_error(key, value)
    if problem:
        raise SelectorError(problem)
    return value


def _requirement(part: str) -> Requirement:
    if not part.strip():
        raise SelectorError("an empty requirement (two commas in a row, or one at an end)")
    match = _SET.match(part)
    if match:
        key, operator, inner = match.groups()
        values = [value.strip() for value in inner.split(",")]
        if values == [""]:
            raise SelectorError(f"{_shown(part.strip())}: the set of values is empty")
        checked = frozenset(_checked_value(key, value) for value in values)
        return Requirement(_checked_key(key), "in" if operator == "in" else "notin", checked)
    match = _EQUALITY.match(part)
    if match:
        key, operator, value = match.groups()
        kind: Operator = "!=" if operator == "!=" else "="
        return Requirement(_checked_key(key), kind, frozenset({_checked_value(key, value)}))
    match = _EXISTS.match(part)
    if match:
        negated, key = match.groups()
        return Requirement(_checked_key(key), "!" if negated else "exists")
    raise SelectorError(
        f"{_shown(part.strip())} is not a requirement: use key=value, key!=value, key in (a,b), "
        "key notin (a,b), key or !key"
    )


def parse_selector(text: str) -> Selector:
    """The selector text means; SelectorError naming what is wrong. "" selects everything."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(f"is {len(text)} characters; at most {MAX_SELECTOR_LENGTH}")
    if not text.strip():
        return Selector()
    return Selector(tuple(_requirement(part) for part in _split(text)))


def selector_field(text: str, field: str = "label_selector") -> Selector:
    """parse_selector for a request's field: InvalidArgument naming the field and what is wrong."""
    try:
        return parse_selector(text)
    except SelectorError as exc:
        raise InvalidArgument.single(field, str(exc)) from None
