"""Each agent's own login to the embedded nats-server, kept in step with the agents there are.

What the manager sees of it (manager.launch.AgentLogins): the variables an agent is started
with (NATS_USER, NATS_PASSWORD, NATS_INBOX_PREFIX), admit() before an agent's process starts,
which returns once the server takes its login, and forget() when an agent is deleted.

Changes are applied by one reload at a time: while one is in flight, further changes wait,
and the next reload takes all of them (500 agents registered and started at once cost a few
reloads, not 500). A reload that fails (the server is down, or did not take the file in time)
is retried with backoff; meanwhile admit() gives up after its own bound, logging why, and the
agent starts anyway: its NATS client keeps retrying until its login exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping

import structlog

from opmasd.bus.embedded import EmbeddedNatsError, EmbeddedNatsServer
from opmasd.bus.embedded_users import agent_user
from opmasd.core.ids import is_valid_agent_id
from opmasd.core.model import AgentRecord
from opmasd.core.tasks import TaskOwner

log = structlog.get_logger(__name__)

ADMIT_TIMEOUT = 5.0
RETRY_MAX = 30.0


class EmbeddedAgentLogins:
    def __init__(self, server: EmbeddedNatsServer, admit_timeout: float = ADMIT_TIMEOUT) -> None:
        self._server = server
        self._admit_timeout = admit_timeout
        self._tasks = TaskOwner("nats-logins")
        self._reloader: asyncio.Task[None] | None = None
        self._pending = False
        self._changed = asyncio.Event()
        server.on_users_loaded = self._on_loaded
        self.reloads = 0

    def expect(self, records: Iterable[AgentRecord], node: str) -> None:
        """The agents of this node the store knows, before the server starts: they are in its
        first configuration (no reload), and those still running since an earlier opmasd log
        in again at once."""
        self._server.agents.update(
            r.agent_id for r in records if r.node == node and not r.deleted and is_valid_agent_id(r.agent_id)
        )

    # -- manager.launch.AgentLogins ---------------------------------------------------------------

    def environment(self, agent_id: str) -> Mapping[str, str]:
        server = self._server
        if not is_valid_agent_id(agent_id):
            return {}  # not a subject token: it can have no login (registration refuses such ids)
        return {
            "NATS_USER": agent_user(agent_id),
            "NATS_PASSWORD": server.users.agent_password(agent_id),
            "NATS_INBOX_PREFIX": server.users.subjects.agent_inbox(agent_id),
        }

    async def admit(self, agent_id: str) -> None:
        server = self._server
        if agent_id in server.agents and agent_id in server.loaded_agents:
            return
        if not is_valid_agent_id(agent_id) or self._tasks.closed:
            return  # no login possible; or opmasd is stopping
        server.agents.add(agent_id)
        self._request()
        if not await self._until(lambda: agent_id in server.loaded_agents, self._admit_timeout):
            log.error(
                "the embedded NATS server has not taken the agent's login yet; starting the agent "
                "anyway (its NATS client retries until it can log in)",
                agent_id=agent_id,
                waited=self._admit_timeout,
                log=str(server.log_path),
            )

    def forget(self, agent_id: str) -> None:
        if agent_id in self._server.agents:
            self._server.agents.discard(agent_id)
            self._request()

    # -- the reloads ------------------------------------------------------------------------------

    async def settled(self, timeout: float) -> bool:
        """Whether the server has (or within timeout takes) exactly the agents wanted now."""
        server = self._server
        return await self._until(lambda: server.loaded_agents == server.agents, timeout)

    async def close(self) -> None:
        await self._tasks.close()

    def _request(self) -> None:
        self._pending = True
        if self._tasks.closed:
            return  # opmasd is stopping: the next start writes the configuration anew
        if self._reloader is None or self._reloader.done():
            self._reloader = self._tasks.spawn(self._reload_while_pending(), "reload")

    async def _reload_while_pending(self) -> None:
        delay = 0.5
        while self._pending:
            self._pending = False
            started = time.monotonic()
            try:
                await self._server.reload_users()
            except (EmbeddedNatsError, OSError) as exc:
                log.error(
                    "the embedded NATS server did not take the agents' logins; retrying",
                    error=str(exc).splitlines()[0],
                    retry_in=delay,
                )
                self._pending = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self.reloads += 1
            delay = 0.5
            log.debug(
                "embedded NATS server took the agents' logins",
                agents=len(self._server.loaded_agents),
                seconds=round(time.monotonic() - started, 3),
            )

    def _on_loaded(self) -> None:
        # Wake every waiter; each checks its own condition and waits again if need be.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return done()
        return True
