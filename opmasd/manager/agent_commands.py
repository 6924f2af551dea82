"""Custom commands to an agent: the checks before one is sent over the bus, and its errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opmasd.bus.base import AgentBus
from opmasd.core.errors import (
    BusRejected,
    BusTimeout,
    BusUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from opmasd.core.messages import CommandReply
from opmasd.core.model import AgentRecord

DEFAULT_COMMAND_TIMEOUT = 5.0
MAX_COMMAND_TIMEOUT = 300.0


async def deliver_command(
    bus: AgentBus | None,
    get_agent: Callable[[str], AgentRecord],
    agent_id: str,
    command: str,
    params: Mapping[str, Any],
    timeout: float | None,
) -> CommandReply:
    """Send command to the running agent and return its reply, as the API's errors."""
    if not command.strip():
        raise InvalidArgument.single("command", "must not be empty")
    if timeout is not None and not 0 < timeout <= MAX_COMMAND_TIMEOUT:
        raise InvalidArgument.single(
            "timeout", f"must be in (0, {MAX_COMMAND_TIMEOUT:g}] seconds, got {timeout:g}"
        )
    timeout = timeout or DEFAULT_COMMAND_TIMEOUT
    rec = get_agent(agent_id)
    if bus is None:
        raise Unavailable("commands need NATS, and this opmasd runs without it")
    if rec.pid is None:
        raise FailedPrecondition(f"agent {agent_id} is not running (state {rec.state.value})")
    try:
        return await bus.command_agent(agent_id, command, params, timeout)
    except BusTimeout:
        raise DeadlineExceeded(f"agent {agent_id} did not answer {command!r} within {timeout:g}s") from None
    except BusUnavailable as exc:
        raise Unavailable(f"cannot reach agent {agent_id}: NATS is unavailable ({exc})") from None
    except BusRejected as exc:
        raise InvalidArgument.single("params", str(exc)) from None
