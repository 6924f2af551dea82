"""`run(MyAgent)`: environment in, logging set up, the agent served, the process exit code out.

Signals are the runner's alone (STYLE: no library takes over signal handling): the first
SIGTERM or SIGINT asks the agent to stop gracefully, a second one stops it at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from typing import NoReturn

import structlog

from ._agent import Agent
from ._context import AgentContext, ConfigError
from ._logging import configure_logging
from ._nats import NatsTransport

# Exit codes: 0 stopped as asked; 1 failed (setup, run or teardown raised, forced stop);
# 2 the configuration is invalid (restarting will not help).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def run(agent_cls: type[Agent], *, environ: Mapping[str, str] | None = None) -> NoReturn:
    """Run `agent_cls` as this process's agent and exit with its exit code.

    Example (the package's `__main__.py`):
        from opmas_agent import run
        from .agent import MyAgent

        run(MyAgent)
    """
    sys.exit(main(agent_cls, environ))


def main(agent_cls: type[Agent], environ: Mapping[str, str] | None = None) -> int:
    """`run` without the exit: returns the exit code."""
    env = os.environ if environ is None else environ
    try:
        context = AgentContext.from_env(env, default_id=agent_cls.default_id)
    except ConfigError as exc:
        configure_logging()
        structlog.get_logger("opmas_agent").error("invalid configuration", error=str(exc))
        return EXIT_CONFIG
    configure_logging(context.log_level)
    return asyncio.run(_serve(agent_cls, context))


async def _serve(agent_cls: type[Agent], context: AgentContext) -> int:
    log = structlog.get_logger("opmas_agent").bind(agent_id=context.agent_id)
    transport = NatsTransport(
        context.nats_url,
        name=context.agent_id,
        user=context.nats_user,
        password=context.nats_password,
        inbox_prefix=context.nats_inbox_prefix,
        log=log,
    )
    try:
        agent = agent_cls(context, transport)
    except Exception:
        log.exception("agent could not be created")
        return EXIT_FAILED
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            agent.request_stop(f"signal {sig.name}")
        elif main_task is not None:
            log.warning("second signal: stopping now", signal=sig.name)
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await agent.serve()
    except asyncio.CancelledError:
        if seen < 2:
            raise
        return EXIT_FAILED
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
