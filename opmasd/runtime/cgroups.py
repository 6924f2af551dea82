"""A cgroup (v2) per agent: the kernel's own list of every process an agent started.

A process group misses what calls setsid, and a descendant scan of /proc misses what was
reparented before the scan (a double fork). A cgroup misses nothing: every process forked
inside one stays there unless moved by someone allowed to, so the agent's tree is exactly the
members of its cgroup, a stop can be verified (the cgroup is empty), and `cgroup.kill` kills
all of them at once, newborn ones included. A restarted daemon also finds there each process
it launched, even one whose PID it died before recording (runtime.process, adopt).

The daemon needs a cgroup it may create children in: the root of the cgroup2 hierarchy when it
runs there (a VM or container without systemd), or its own cgroup when systemd delegated it
(`Delegate=yes`). Anywhere else (a login session, a non-delegated unit) it is not ours to
write, and the process runtime falls back to process groups and /proc scans (detect says why).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_AGENT_PREFIX = "agent-"
# cgroup.kill's fallback (kernels before 5.14) signals the members this many rounds at most.
_KILL_ROUNDS = 20


class AgentCgroups:
    """The agent cgroups under one base directory that this daemon owns."""

    def __init__(self, base: Path) -> None:
        self.base = base

    @classmethod
    def detect(cls, state_dir: Path) -> tuple[AgentCgroups | None, str]:
        """The cgroups for the daemon of `state_dir`, or None and why not.

        Daemons of different state directories get different bases, so that two of them on one
        host never mistake each other's processes for their own.
        """
        mount = cgroup2_mount()
        if mount is None:
            return None, "no cgroup2 hierarchy is mounted"
        own = own_cgroup()
        if own is None:
            return None, "this process is in no cgroup2 cgroup"
        instance = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
        if own == "/":
            base = mount / f"opmasd-{instance}"
        elif delegated(mount / own.lstrip("/")):
            base = mount / own.lstrip("/") / f"agents-{instance}"
        else:
            return None, f"cgroup {own} is not delegated to opmasd (Delegate=yes)"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            return None, f"cannot create cgroup {base}: {exc.strerror or exc}"
        if not os.access(base / "cgroup.procs", os.W_OK):
            return None, f"cgroup {base} is not writable"
        return cls(base), f"one cgroup per agent under {base}"

    def path(self, agent_id: str) -> Path:
        return self.base / f"{_AGENT_PREFIX}{agent_id}"

    def prepare(self, agent_id: str) -> Path:
        """Create the agent's cgroup (if needed); the cgroup.procs file a process joins by."""
        path = self.path(agent_id)
        path.mkdir(exist_ok=True)
        return path / "cgroup.procs"

    def agents(self) -> list[str]:
        """The agents that have a cgroup here, from an earlier process of this daemon or this one."""
        try:
            names = os.listdir(self.base)
        except OSError as exc:
            log.warning("cannot list agent cgroups", base=str(self.base), error=str(exc))
            return []
        return sorted(name.removeprefix(_AGENT_PREFIX) for name in names if name.startswith(_AGENT_PREFIX))

    def members(self, agent_id: str) -> list[int]:
        """PIDs in the agent's cgroup, unsorted ([] when it has none or no cgroup)."""
        try:
            with open(self.path(agent_id) / "cgroup.procs", "rb") as file:
                return [int(line) for line in file.read().split()]
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cannot read an agent cgroup", agent_id=agent_id, error=str(exc))
            return []

    def populated(self, agent_id: str) -> bool:
        try:
            with open(self.path(agent_id) / "cgroup.events", "rb") as file:
                return b"populated 1" in file.read()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot read an agent cgroup's events", agent_id=agent_id, error=str(exc))
            return bool(self.members(agent_id))

    def kill(self, agent_id: str) -> None:
        """SIGKILL every process in the agent's cgroup, atomically where the kernel can."""
        try:
            with open(self.path(agent_id) / "cgroup.kill", "wb") as file:
                file.write(b"1")
            return
        except FileNotFoundError:
            if not self.path(agent_id).exists():
                return
        except OSError as exc:
            log.warning("cgroup.kill failed; killing members one by one", agent_id=agent_id, error=str(exc))
        for _ in range(_KILL_ROUNDS):
            pids = self.members(agent_id)
            if not pids:
                return
            for pid in pids:
                signal_pid(pid, signal.SIGKILL)

    def remove(self, agent_id: str) -> None:
        """Remove the agent's cgroup; it must be empty (a busy one is logged and left)."""
        try:
            os.rmdir(self.path(agent_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            level = log.info if exc.errno == errno.EBUSY else log.warning
            level("agent cgroup not removed", agent_id=agent_id, error=str(exc))

    def close(self) -> None:
        """Remove the base when no agent cgroup is left in it (daemon shutdown)."""
        try:
            os.rmdir(self.base)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                log.warning("agent cgroup base not removed", base=str(self.base), error=str(exc))


def signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("cannot signal process", pid=pid, signal=sig.name, error=str(exc))


def cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or .../unified in hybrid mode)."""
    try:
        with open("/proc/self/mountinfo", "rb") as file:
            lines = file.read(1 << 20).splitlines()
    except OSError:
        return None
    for line in lines:
        # "... mount-point options [optional fields] - fstype source super-options"
        head, sep, tail = line.partition(b" - ")
        if sep and tail.split(b" ", 1)[0] == b"cgroup2":
            return Path(os.fsdecode(head.split(b" ")[4]))
    return None


def own_cgroup() -> str | None:
    """This process's cgroup2 path ("0::<path>" in /proc/self/cgroup)."""
    try:
        with open("/proc/self/cgroup", "rb") as file:
            lines = file.read(1 << 16).splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(b"0::"):
            return os.fsdecode(line[3:]) or "/"
    return None


def delegated(path: Path) -> bool:
    """Whether systemd delegated this cgroup (it marks it with a `delegate` extended attribute)."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            continue
    return False


def joining_command(procs_file: Path, command: tuple[str, ...]) -> tuple[str, ...]:
    """`command`, run so that it is in the cgroup of `procs_file` before its first instruction.

    The child shell moves itself ("0" is the writer) and then execs the agent's program in
    place, so the agent keeps the PID Popen returned and everything it forks is born inside.
    (Python's subprocess cannot fork into a cgroup, and moving the child after Popen returns
    would leave a window in which a fast fork escapes, or a daemon killed meanwhile loses it.)
    """
    script = 'echo 0 > "$0" || exit 126; exec "$@"'
    return ("/bin/sh", "-c", script, str(procs_file), *command)
