"""Commands on the wire (DESIGN §5): parsing requests, building responses, the `command` decorator.

Request:  {"command": "...", "agent_id": "...", "params": {...}, "timestamp": "..."}
Response: {"status": "success|error", "command", "agent_id", "result", "error", "timestamp"}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, overload

from ._time import timestamp

F = TypeVar("F", bound=Callable[..., Any])
# The attribute `command` sets on a handler; Agent.__init_subclass__ collects them.
MARK = "__opmas_command__"


class CommandError(Exception):
    """Raised by a command handler: the reply is an error carrying this message."""


@overload
def command(name: F, /) -> F: ...
@overload
def command(name: str | None = None, /) -> Callable[[F], F]: ...
def command(name: str | F | None = None, /) -> F | Callable[[F], F]:
    """Mark an Agent method as the handler of a custom command.

    The handler takes the request's `params` dict and returns a JSON-serialisable result;
    it may be sync or async. Raise CommandError for an error reply.

    Example:
        class MyAgent(Agent):
            @command
            async def reset(self, params: dict[str, Any]) -> dict[str, int]:
                ...

            @command("top-talkers")
            def top(self, params: dict[str, Any]) -> list[str]:
                ...
    """
    if callable(name):
        setattr(name, MARK, name.__name__)
        return name

    def mark(fn: F) -> F:
        setattr(fn, MARK, name or fn.__name__)
        return fn

    return mark


@dataclass(frozen=True)
class Request:
    command: str
    params: dict[str, Any]


def parse_request(data: bytes, agent_id: str) -> Request:
    """Decode and check one command request; CommandError says what is wrong with it."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"malformed request: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise CommandError("malformed request: expected a JSON object")
    name = body.get("command")
    if not isinstance(name, str) or not name.strip():
        raise CommandError("malformed request: 'command' must be a non-empty string")
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise CommandError("malformed request: 'params' must be an object")
    target = body.get("agent_id")
    # Absent is fine (the subject already names us); a different id means a misrouted request.
    if target not in (None, "", agent_id):
        raise CommandError(f"request for agent {target!r} reached agent {agent_id!r}")
    return Request(command=name.strip(), params=params)


def command_name_of(data: bytes) -> str:
    """Best effort: the command a (possibly malformed) request named, for its error reply."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return ""
    name = body.get("command") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""


def response(command: str, agent_id: str, *, result: Any = None, error: str | None = None) -> dict[str, Any]:
    return {
        "status": "error" if error is not None else "success",
        "command": command,
        "agent_id": agent_id,
        "result": result,
        "error": error,
        "timestamp": timestamp(),
    }


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode(payload: Mapping[str, Any]) -> bytes:
    """JSON for the wire: compact, datetimes as RFC 3339, sets as sorted lists."""
    return json.dumps(payload, separators=(",", ":"), default=_default).encode()
