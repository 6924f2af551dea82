"""The domain model: what an agent is, what is wanted of it and what is observed, as plain values.

Free of gRPC, NATS and database types.

Protobuf messages (api/), JSON payloads (bus/) and database rows (store/) are converted to and
from these at their own edges, one place each.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from opmasd.core.clock import utcnow
from opmasd.core.privileges import Sandbox


class AgentState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"
    INACTIVE = "inactive"
    BACKOFF = "backoff"

    @property
    def has_process(self) -> bool:
        """Whether an agent in this state has (or is about to have) a live process."""
        return self in (AgentState.STARTING, AgentState.RUNNING, AgentState.STOPPING, AgentState.INACTIVE)


class DesiredState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"


class RestartPolicy(enum.Enum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class RuntimeKind(enum.Enum):
    PROCESS = "process"
    SYSTEMD = "systemd"


class AgentSource(enum.Enum):
    DISCOVERED = "discovered"
    REGISTERED = "registered"


@dataclass(frozen=True)
class ResourceLimits:
    memory_max_bytes: int = 0
    cpu_quota_percent: float = 0.0
    tasks_max: int = 0
    open_files_max: int = 0


@dataclass(frozen=True)
class AgentSpec:
    """What an agent is and how to run it: a manifest's content, validated."""

    name: str
    command: tuple[str, ...]
    type: str = "generic"
    version: str = "0.0.0"
    description: str = ""
    working_directory: str = ""
    environment: tuple[tuple[str, str], ...] = ()
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    stop_timeout: float = 10.0
    # 0: not declared (the agent heartbeats at its own default, judged on heartbeat_timeout).
    heartbeat_interval: float = 0.0
    # How long a new process must stay up (or until its first heartbeat) to count as started.
    start_seconds: float = 1.0
    resources: ResourceLimits = ResourceLimits()
    runtime: RuntimeKind = RuntimeKind.PROCESS
    autostart: bool = False
    restart_on_inactive: bool = False
    # Key/value pairs that group agents for selectors (core.labels), sorted by key.
    labels: tuple[tuple[str, str], ...] = ()
    # Who the process runs as: a user (name or uid) and a group (name or gid); "": opmasd's own.
    user: str = ""
    group: str = ""
    # Linux capabilities it keeps (CAP_* names, sorted) and its sandboxing (core.privileges).
    capabilities: tuple[str, ...] = ()
    sandbox: Sandbox = Sandbox()

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environment)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @cached_property
    def json_text(self) -> str:
        """to_dict as JSON with sorted keys (the same spec, the same text), made once per spec:
        every row written of an agent carries it, and a spec changes far less often."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, for the store."""
        return {
            "name": self.name,
            "command": list(self.command),
            "type": self.type,
            "version": self.version,
            "description": self.description,
            "working_directory": self.working_directory,
            "environment": dict(self.environment),
            "restart_policy": self.restart_policy.value,
            "stop_timeout": self.stop_timeout,
            "heartbeat_interval": self.heartbeat_interval,
            "start_seconds": self.start_seconds,
            "resources": {
                "memory_max_bytes": self.resources.memory_max_bytes,
                "cpu_quota_percent": self.resources.cpu_quota_percent,
                "tasks_max": self.resources.tasks_max,
                "open_files_max": self.resources.open_files_max,
            },
            "runtime": self.runtime.value,
            "autostart": self.autostart,
            "restart_on_inactive": self.restart_on_inactive,
            "labels": dict(self.labels),
            # Only when set: the rows of the agents that run as opmasd stay as they were.
            **({"user": self.user} if self.user else {}),
            **({"group": self.group} if self.group else {}),
            **({"capabilities": list(self.capabilities)} if self.capabilities else {}),
            **({"sandbox": sandbox} if (sandbox := self.sandbox.to_dict()) else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentSpec:
        """The inverse of to_dict; trusts its input (it comes from our own store). A key that
        is missing (a row written by an older version) takes the field's default."""
        default = _DEFAULT_SPEC
        res = data.get("resources") or {}
        limits = default.resources
        return cls(
            name=data["name"],
            command=tuple(data["command"]),
            type=data.get("type", default.type),
            version=data.get("version", default.version),
            description=data.get("description", default.description),
            working_directory=data.get("working_directory", default.working_directory),
            environment=tuple(sorted((data.get("environment") or {}).items())),
            restart_policy=RestartPolicy(data.get("restart_policy", default.restart_policy.value)),
            stop_timeout=float(data.get("stop_timeout", default.stop_timeout)),
            heartbeat_interval=float(data.get("heartbeat_interval", default.heartbeat_interval)),
            start_seconds=float(data.get("start_seconds", default.start_seconds)),
            resources=ResourceLimits(
                memory_max_bytes=int(res.get("memory_max_bytes", limits.memory_max_bytes)),
                cpu_quota_percent=float(res.get("cpu_quota_percent", limits.cpu_quota_percent)),
                tasks_max=int(res.get("tasks_max", limits.tasks_max)),
                open_files_max=int(res.get("open_files_max", limits.open_files_max)),
            ),
            runtime=RuntimeKind(data.get("runtime", default.runtime.value)),
            autostart=bool(data.get("autostart", default.autostart)),
            restart_on_inactive=bool(data.get("restart_on_inactive", default.restart_on_inactive)),
            labels=tuple(sorted((data.get("labels") or {}).items())),
            user=str(data.get("user", "")),
            group=str(data.get("group", "")),
            capabilities=tuple(data.get("capabilities") or ()),
            sandbox=Sandbox.from_dict(data.get("sandbox") or {}),
        )


# The field defaults, read by from_dict (one copy of each default: the dataclass's).
_DEFAULT_SPEC = AgentSpec(name="", command=())


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended. exit_code and signal are None when unknown (an adopted process)."""

    exit_code: int | None
    signal: int | None
    time: datetime = field(default_factory=utcnow)
    # Processes of the agent's tree still alive after it ended, killed by the runtime
    # ("PID command" each): shown in the reason, so the event and the status name them.
    leftovers: tuple[str, ...] = ()
    # Why it ended when the runtime knows more than the status says ("out of memory
    # (MemoryMax)"): appended to the reason; "" when there is nothing to add.
    cause: str = ""

    @property
    def success(self) -> bool:
        return self.exit_code == 0 and self.signal is None

    @property
    def reason(self) -> str:
        how = f"{self._how}: {self.cause}" if self.cause else self._how
        if not self.leftovers:
            return how
        shown = ", ".join(self.leftovers[:5]) + (", …" if len(self.leftovers) > 5 else "")
        return f"{how}; killed {len(self.leftovers)} leftover process(es): {shown}"

    @property
    def _how(self) -> str:
        if self.signal is not None:
            import signal as _signal

            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.exit_code is None:
            return "exited (status unknown: process was adopted)"
        return f"exited with code {self.exit_code}"


# Seconds since boot are below this for 30 years of uptime; epoch seconds are above it.
LEGACY_START_TIME_FLOOR = 1_000_000_000.0


@dataclass(frozen=True)
class ProcessHandle:
    """A running agent process as the runtime sees it.

    start_time is the kernel's process start time in seconds since boot (/proc/PID/stat, the
    timescale of Clock.monotonic): with the PID it identifies the process, since PIDs are
    reused, and no wall-clock step can change it. Rows written before this was so hold
    psutil's wall-clock create_time instead (a value past LEGACY_START_TIME_FLOOR).
    """

    pid: int
    start_time: float


@dataclass
class AgentRecord:
    """One agent: its spec, what the operator wants, and what is observed."""

    agent_id: str
    spec: AgentSpec
    source: AgentSource = AgentSource.REGISTERED
    manifest_path: str = ""
    node: str = ""
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    deleted: bool = False

    desired: DesiredState = DesiredState.STOPPED
    state: AgentState = AgentState.STOPPED
    state_reason: str = "registered"
    state_changed_at: datetime = field(default_factory=utcnow)

    pid: int | None = None
    pid_start_time: float | None = None
    started_at: datetime | None = None
    restart_count: int = 0
    # Exits since the agent last ran for the stability window: drives backoff and the
    # crash-loop limit. restart_count only grows (until the operator starts it anew).
    consecutive_failures: int = 0
    last_exit: ExitInfo | None = None
    last_heartbeat: datetime | None = None
    next_restart_at: datetime | None = None
    # The same moments on the monotonic clock (Clock.monotonic), which durations are measured
    # on: held in memory only, since a wall time may step. After a daemon restart
    # started_monotonic is the adopted process's own start time (boot-relative).
    started_monotonic: float | None = None
    heard_monotonic: float | None = None

    def copy(self) -> AgentRecord:
        # A shallow copy of the fields (all immutable values): dataclasses.replace re-runs
        # __init__ through keyword arguments, several times slower, and a snapshot is taken at
        # every change of every agent.
        clone = object.__new__(AgentRecord)
        clone.__dict__.update(self.__dict__)
        return clone

    def uptime(self, monotonic_now: float) -> float | None:
        """Seconds its process has been running at `monotonic_now`; None without a process."""
        if self.started_monotonic is None or self.pid is None:
            return None
        return max(0.0, monotonic_now - self.started_monotonic)

    @property
    def handle(self) -> ProcessHandle | None:
        if self.pid is None or self.pid_start_time is None:
            return None
        return ProcessHandle(self.pid, self.pid_start_time)


@dataclass(frozen=True)
class ProcessUsage:
    """CPU, memory, threads and open files of an agent's process tree, as last sampled."""

    cpu_percent: float
    rss_bytes: int
    num_threads: int
    open_fds: int


@dataclass(frozen=True)
class Transition:
    """One stored state change of an agent, with why it happened."""

    agent_id: str
    previous: AgentState
    state: AgentState
    reason: str
    at: datetime = field(default_factory=utcnow)
