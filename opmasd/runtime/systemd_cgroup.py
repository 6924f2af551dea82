"""A systemd unit's cgroup as files: where they are, usage read from them, OOM kills seen in them.

systemd names a unit's cgroup by its path below the hierarchies' root (the ControlGroup
property, "/system.slice/x.service"); the files are under /sys/fs/cgroup, laid out one of three
ways: cgroup v2 alone (every controller in one tree), hybrid (v1 controllers each in a tree of
its own, plus a v2 tree at /sys/fs/cgroup/unified that holds no controller) or v1 alone.
CgroupLayout finds which, once, by looking at the mount points, as systemd itself does.

Every read here is a small file (a counter, a list of PIDs, at most _READ_MAX bytes) read at
once: cheap enough for the event loop, which usage() runs on.

`root` is where the filesystem of the systemd that runs the units is seen from here: "/" in
production; /proc/<PID>/root for a systemd booted in namespaces of its own (the tests), whose
/sys/fs/cgroup and /proc (PIDs as that systemd counts them) are its own mounts.

OOM kills: on cgroup v2 systemd sees them itself (memory.events) and reports Result=oom-kill.
On v1 (these hosts) systemd 252 does not: the unit fails with a plain SIGKILL, and by the time
its exit is signalled over D-Bus the unit's cgroup is already removed, with its counters. So
OomWatch registers a v1 OOM notification (an eventfd on memory.oom_control, through
cgroup.event_control) while the unit runs; the kernel signals it when the cgroup meets its
limit — before the OOM killer kills — and once more when the cgroup is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from opmasd.core.model import ProcessUsage, ResourceLimits
from opmasd.runtime import procstat

log = structlog.get_logger(__name__)

_READ_MAX = 64 * 1024
# The CPU fallback reads at most this many processes' stat lines per sample.
_PROCS_MAX = 256
# How long an exit waits to tell a late OOM notification from the cgroup's removal (see oom_at_exit).
OOM_SETTLE = 0.25

# The spec's field for each controller that enforces it (as runtime.cgroup_limits names them).
FIELDS = {
    "memory": "resources.memory_max_bytes",
    "cpu": "resources.cpu_quota_percent",
    "pids": "resources.tasks_max",
}


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as file:
            return file.read(_READ_MAX).decode("ascii", "replace")
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text.split()[0])
    except (ValueError, IndexError):
        return None


def keyed(text: str, key: str) -> int | None:
    """The value of `key` in a flat keyed file ("usage_usec 123\\noom_kill 0\\n")."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class CgroupLayout:
    """Where each kind of cgroup file is, as hierarchy roots (None: not on this host)."""

    proc_root: Path  # the /proc that counts PIDs as systemd does
    memory: Path | None  # memory.current (v2) or memory.usage_in_bytes (v1) below it
    memory_v1: bool
    cpu_stat: Path | None  # v2 cpu.stat (usage_usec): present in every v2 cgroup
    cpuacct: Path | None  # v1 cpuacct.usage (nanoseconds)
    procs: Path | None  # a hierarchy whose cgroup.procs lists the unit's processes
    controllers: frozenset[str]  # memory, cpu, pids: those the units' cgroups can have

    @classmethod
    def find(cls, root: Path = Path("/")) -> CgroupLayout:
        base = root / "sys/fs/cgroup"
        proc_root = root / "proc"
        offered = _read(base / "cgroup.controllers")
        if offered is not None:  # v2 alone
            offers = frozenset(offered.split()) & frozenset(FIELDS)
            memory = base if "memory" in offers else None
            return cls(proc_root, memory, memory_v1=False, cpu_stat=base, cpuacct=None, procs=base,
                       controllers=offers)  # fmt: skip
        unified = base / "unified" if (base / "unified" / "cgroup.procs").exists() else None
        v1 = {name: base / name for name in ("memory", "cpu,cpuacct", "cpu", "cpuacct", "pids", "systemd")
              if (base / name).is_dir()}  # fmt: skip
        have = {"memory", "pids"} & v1.keys() | ({"cpu"} if v1.keys() & {"cpu", "cpu,cpuacct"} else set())
        return cls(
            proc_root,
            v1.get("memory"),
            memory_v1=True,
            cpu_stat=unified,
            cpuacct=v1.get("cpu,cpuacct") or v1.get("cpuacct"),
            procs=unified or v1.get("systemd"),
            controllers=frozenset(have),
        )

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        """(field, why) for each limit whose controller this host's cgroups lack."""
        need = {
            "memory": resources.memory_max_bytes > 0,
            "cpu": resources.cpu_quota_percent > 0,
            "pids": resources.tasks_max > 0,
        }
        return [
            (spec_field, f"the systemd runtime cannot enforce it: this host has no {name} cgroup controller")
            for name, spec_field in FIELDS.items()
            if need[name] and name not in self.controllers
        ]


@dataclass
class UnitUsage:
    """Samples one unit's cgroup (and its main process) for ProcessUsage; keeps the last CPU
    reading, since CPU percent is the usage between two samples."""

    layout: CgroupLayout
    control_group: str  # the ControlGroup property
    main_pid: int
    monotonic: float = 0.0
    cpu_seconds: float | None = None
    _where: dict[str, Path | None] = field(default_factory=dict)

    def _dir(self, hierarchy: Path | None) -> Path | None:
        if hierarchy is None or not self.control_group:
            return None
        return hierarchy / self.control_group.lstrip("/")

    def memory_bytes(self) -> int:
        where = self._dir(self.layout.memory)
        if where is None:
            return 0
        name = "memory.usage_in_bytes" if self.layout.memory_v1 else "memory.current"
        return _int(where / name) or 0

    def cpu_total(self) -> float | None:
        """CPU seconds the unit's processes used so far: v2 cpu.stat, v1 cpuacct.usage, else the
        sum over its current processes (which forgets the ones that ended)."""
        stat = self._dir(self.layout.cpu_stat)
        if stat is not None and (text := _read(stat / "cpu.stat")) is not None:
            usec = keyed(text, "usage_usec")
            if usec is not None:
                return usec / 1e6
        acct = self._dir(self.layout.cpuacct)
        if acct is not None and (nsec := _int(acct / "cpuacct.usage")) is not None:
            return nsec / 1e9
        ticks = 0
        for pid in self.pids()[:_PROCS_MAX]:
            raw = _read(self.layout.proc_root / str(pid) / "stat")
            if raw is None:
                continue
            fields = raw[raw.rfind(")") + 2 :].split()
            with contextlib.suppress(ValueError, IndexError):
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / procstat.CLOCK_TICKS

    def pids(self) -> list[int]:
        where = self._dir(self.layout.procs)
        text = None if where is None else _read(where / "cgroup.procs")
        return [int(p) for p in text.split() if p.isdigit()] if text else [self.main_pid]

    def sample(self, monotonic: float) -> ProcessUsage:
        cpu = self.cpu_total()
        percent = 0.0
        if cpu is not None and self.cpu_seconds is not None and monotonic > self.monotonic:
            percent = max(0.0, (cpu - self.cpu_seconds) / (monotonic - self.monotonic) * 100.0)
        self.monotonic, self.cpu_seconds = monotonic, cpu
        proc = self.layout.proc_root / str(self.main_pid)
        status = _read(proc / "status") or ""
        threads = keyed(status.replace(":\t", " "), "Threads") or 0
        try:
            fds = len(os.listdir(proc / "fd"))
        except OSError:
            fds = 0
        return ProcessUsage(
            cpu_percent=percent, rss_bytes=self.memory_bytes(), num_threads=threads, open_fds=fds
        )


class OomWatch:
    """A v1 memory cgroup's OOM notifications (see the module doc); registered while its unit
    runs, asked once at the unit's exit. Notifications read while the cgroup still exists are
    OOMs; after its removal one of them is the removal itself."""

    def __init__(self, cgroup: Path, eventfd: int) -> None:
        self.cgroup = cgroup
        self._fd = eventfd
        self.ooms = 0  # notifications read while the cgroup existed: OOMs for certain
        self.late = 0  # notifications read once it was gone: the removal and maybe an OOM
        self.changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(eventfd, self._on_ready)

    @classmethod
    def start(cls, layout: CgroupLayout, control_group: str) -> OomWatch | None:
        """Watch the unit's v1 memory cgroup; None on v2 (systemd reports OOM kills itself),
        without a memory controller, or when the cgroup cannot be watched (logged)."""
        if not layout.memory_v1 or layout.memory is None or not control_group:
            return None
        cgroup = layout.memory / control_group.lstrip("/")
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            control = os.open(cgroup / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(cgroup / "cgroup.event_control", "w", encoding="ascii") as file:
                    file.write(f"{eventfd} {control}")
            finally:
                os.close(control)
        except OSError as exc:
            os.close(eventfd)
            log.warning("cannot watch a unit's cgroup for OOM kills", cgroup=str(cgroup), error=str(exc))
            return None
        return cls(cgroup, eventfd)

    def _on_ready(self) -> None:
        count = self._drain()
        if count:
            if self.cgroup.is_dir():
                self.ooms += count
            else:
                self.late += count
            self.changed.set()

    def _drain(self) -> int:
        try:
            return os.eventfd_read(self._fd)
        except (BlockingIOError, OSError):
            return 0

    def verdict(self) -> bool | None:
        """At the unit's exit (its cgroup gone): whether it had an OOM kill; None when that
        cannot be told yet (one notification, read only after the removal: an OOM whose removal
        notification is still to come, or the removal alone)."""
        self.late += self._drain()
        if self.ooms or self.late >= 2:
            return True
        return False if self.late == 0 else None

    async def settle(self, timeout: float = OOM_SETTLE) -> bool:
        """The verdict once the ambiguity is resolved: a second notification within `timeout`
        means the first was an OOM (the kernel signals the removal a few ms after rmdir)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (verdict := self.verdict()) is None:
            self.changed.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return verdict

    def close(self) -> None:
        if self._fd < 0:
            return
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
