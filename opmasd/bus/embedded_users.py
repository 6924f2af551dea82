"""Who may log in to the embedded nats-server, and what each login may do: its server.conf.

- opmasd's own user (OPMAS_USER), allowed everything; its password is made at the first start
  and kept in `credentials` (0600), so that whatever else reads it (tests, an operator's tool)
  keeps working across restarts;
- one user per agent (`agent-{id}`), allowed only its own subjects (DESIGN §5) and the data
  subjects of nats.agent_publish / nats.agent_subscribe. Its password is derived from the agent
  id and a secret kept in `agent-secret` (0600): stable across restarts of opmasd and of the
  server (agents outlive both and reconnect), with no list of passwords to keep;
- a user with no rights at all (RELOAD_USER) whose password is new in every configuration
  written: once the server takes it, the server has loaded that configuration.

The file is written whole, then renamed over the old one, mode 0600: it holds the passwords, and
only opmasd's user may read it (nats-server runs as that user).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from opmasd.bus.subject_patterns import check_data_pattern
from opmasd.bus.subjects import Subjects

log = structlog.get_logger(__name__)

OPMAS_USER = "opmas"
RELOAD_USER = "opmas-reload"
AGENT_USER_PREFIX = "agent-"
# What the shipped agents and the template use: they read logs.> and publish findings.<name>.
DEFAULT_DATA_SUBJECTS = ("logs.>", "findings.>", "events.>")
# nats-server renames its log with a timestamp past this size. Also in the file, not only on
# the command line: a reload refuses a file that would change it (to its default, unset there).
LOG_SIZE_LIMIT = 10 * 1024 * 1024
_PASSWORD = re.compile(r"[A-Za-z0-9_-]{32,}")

Opener = Callable[[Path, int, int], int]


@dataclass(frozen=True)
class DataSubjects:
    """The subject patterns every agent may publish and subscribe to besides its own."""

    publish: Sequence[str] = DEFAULT_DATA_SUBJECTS
    subscribe: Sequence[str] = DEFAULT_DATA_SUBJECTS

    def check(self, prefix: str) -> None:
        """ValueError for a pattern that reaches beyond data (see subject_patterns)."""
        for pattern in (*self.publish, *self.subscribe):
            check_data_pattern(pattern, prefix)


def agent_user(agent_id: str) -> str:
    return f"{AGENT_USER_PREFIX}{agent_id}"


def agent_permissions(subjects: Subjects, agent_id: str, data: DataSubjects) -> dict[str, object]:
    """What agent_id's login may do: explicit allow lists (a deny would win over an allow, so
    "all but the others'" cannot be said). No allow_responses: it would let the agent publish
    on any subject named as the reply of a message it receives, one it sent itself included;
    opmasd's requests name the agent in their reply subject instead (Subjects.agent_replies)."""
    publish = [
        subjects.agent_status(agent_id),
        subjects.agent_metrics(agent_id),
        subjects.agent_response(agent_id),
        subjects.agent_replies(agent_id),
        *data.publish,
    ]
    subscribe = [
        subjects.agent_command(agent_id),
        subjects.agent_query(agent_id),
        f"{subjects.agent_inbox(agent_id)}.>",
        *data.subscribe,
    ]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


class ServerUsers:
    """The logins of one embedded server, kept in its store directory."""

    def __init__(self, store_dir: Path, subjects: Subjects, data: DataSubjects, opener: Opener) -> None:
        data.check(subjects.prefix)
        self.store_dir = store_dir
        self.subjects = subjects
        self.data = data
        self._open = opener  # the server's own: no symlink followed, mode forced
        self.password = ""
        self._secret = b""

    @property
    def credentials_path(self) -> Path:
        return self.store_dir / "credentials"

    @property
    def secret_path(self) -> Path:
        return self.store_dir / "agent-secret"

    def load(self) -> None:
        """Read (or make, at the first start) opmasd's password and the agents' secret."""
        if not self.password:
            self.password = self._kept(self.credentials_path, "password")
        if not self._secret:
            self._secret = self._kept(self.secret_path, "agents' secret").encode()

    def agent_password(self, agent_id: str) -> str:
        if not self._secret:
            raise RuntimeError("the embedded NATS server's secrets are not loaded yet")
        digest = hmac.new(self._secret, f"nats-agent:{agent_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def render(self, agent_ids: Iterable[str], reload_password: str) -> str:
        """server.conf with every user (agents in id order, so the same set writes the same file)."""
        users: list[dict[str, object]] = [
            {"user": OPMAS_USER, "password": self.password},
            {
                "user": RELOAD_USER,
                "password": reload_password,
                "permissions": {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}},
            },
        ]
        for agent_id in sorted(agent_ids):
            users.append(
                {
                    "user": agent_user(agent_id),
                    "password": self.agent_password(agent_id),
                    "permissions": agent_permissions(self.subjects, agent_id, self.data),
                }
            )
        # JSON is valid nats-server configuration; every string in it is quoted.
        lines = ",\n    ".join(json.dumps(user, separators=(", ", ": ")) for user in users)
        return f"logfile_size_limit: {LOG_SIZE_LIMIT}\nauthorization {{\n  users = [\n    {lines}\n  ]\n}}\n"

    def write(self, path: Path, agent_ids: Iterable[str]) -> str:
        """Write the configuration (atomically, 0600); the reload user's new password."""
        self.load()
        reload_password = secrets.token_urlsafe(24)
        text = self.render(agent_ids, reload_password)
        temporary = path.with_name(path.name + ".new")
        temporary.unlink(missing_ok=True)
        fd = self._open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        return reload_password

    def _kept(self, path: Path, what: str) -> str:
        """A secret kept in path (0600), made when there is none or it is unusable."""
        try:
            with os.fdopen(self._open(path, os.O_RDONLY, 0o600), "r") as kept:
                value = kept.read(256).strip()
            if _PASSWORD.fullmatch(value):
                return value
            log.warning("the embedded NATS server's secret file is unusable; making a new one", what=what)
        except FileNotFoundError:
            pass
        value = secrets.token_urlsafe(32)
        with os.fdopen(self._open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(value + "\n")
        return value


async def accepts_login(host: str, port: int, user: str, password: str) -> bool:
    """Whether the NATS server at host:port lets this user and password in now (the text
    protocol: INFO, CONNECT and PING; PONG is yes, -ERR no)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return False
    try:
        await asyncio.wait_for(reader.readline(), 2.0)  # INFO {...}
        hello = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        writer.write(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 2.0)
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answer.startswith(b"PONG")
