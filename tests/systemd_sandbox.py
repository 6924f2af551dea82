"""A throwaway systemd (252) booted as PID 1 of its own namespaces, for tests that need a real one.

The recipe is FIELD-NOTES "Booting systemd for tests": `unshare --pid --fork --mount --uts --ipc
--mount-proc --propagation private`, a private tmpfs on /tmp and /run, and a minimal
`sandbox.target` (Wants=dbus.socket systemd-journald.socket) in /run/systemd/system. Booted that
way systemd still shares the host's filesystem, kernel and cgroup trees, and a boot checked here
changed the host in ways the recipe does not prevent, so the boot script adds:

- a tmpfs on /var/log/journal (the host has one: journald's Storage=auto would write there);
- masks (in the private /run) for the sysinit units that act on the host: tmpfiles (/etc/mtab,
  /var/lib, /dev), sysusers (/etc/passwd), sysctl (kernel settings), utmp (the host's wtmp gained
  a boot and a shutdown record), remount-fs, modules-load, the /dev/log socket, ...; and masks for
  every generator (fstab, sysv, getty, postgresql: none of them has anything to do here);
- a cgroup namespace rooted at cgroups of its own (`opmas-sdtest-*` at the root of each
  hierarchy), with the hierarchies mounted again on a private tmpfs at /sys/fs/cgroup: without
  it systemd puts init.scope and system.slice at the host's cgroup roots (two sandboxes at once
  would share system.slice/systemd-journald.service), and creates directories in the host's
  /sys/fs/cgroup tmpfs that outlive it;
- /dev/console bound to a file of the sandbox (PID 1 writes its status there, not to the
  machine's serial console), and `container=opmas-sdtest` so systemd knows it is in a container
  (no swapoff or reboot(2) of the machine at poweroff).

Options (both empty by default): `shared` host paths under /tmp or /run (a clean clone and its
venv) are bound into the sandbox at the same path (elsewhere they are visible anyway);
`private` paths (/etc/opmas, /var/lib/opmas, ...: what a unit's ConfigurationDirectory= or
StateDirectory= would create in the host's tree) get a tmpfs of their own inside; a mountpoint
missing on the host is made empty for the sandbox's life and removed with it (so two sandboxes
must not have the same private path at once: the first one's stop would detach the other's).

Usage: `with SystemdSandbox() as sd: sd.run("systemctl", "show", "-p", "Version")`;
`sd.bus_address` reaches its system bus from the host. Files the sandbox must see go anywhere
but /tmp and /run (`sd.base_dir` is under /var/tmp). `stop()` powers it off (SIGKILL by PID if
that hangs) and removes its cgroups and directory; every sandbox still running at interpreter exit
is stopped then, and one whose process died without that (SIGKILL) is swept by the next boot.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

SYSTEMD = Path("/lib/systemd/systemd")
# A Python the units inside can run: not sys.executable, which may live under the host's /tmp
# (a clean clone's venv), and /tmp inside is the sandbox's own.
SANDBOX_PYTHON = "/usr/bin/python3"
WORK_ROOT = Path("/var/tmp")
PREFIX = "opmas-sdtest-"
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
GENERATOR_DIRS = (
    Path("/etc/systemd/system-generators"),
    Path("/usr/local/lib/systemd/system-generators"),
    Path("/lib/systemd/system-generators"),
    Path("/usr/lib/systemd/system-generators"),
)
# Units that act on the host's files or kernel (or that nothing here needs), masked by name in
# addition to everything that sysinit.target and local-fs.target pull in by .wants links.
HOST_UNITS = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-sysusers.service",
    "systemd-sysctl.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-remount-fs.service",
    "systemd-modules-load.service",
    "systemd-journal-flush.service",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
    "systemd-random-seed.service",
    "systemd-machine-id-commit.service",
    "systemd-binfmt.service",
    "systemd-hwdb-update.service",
    "systemd-update-done.service",
    "systemd-firstboot.service",
    "systemd-pstore.service",
    "systemd-timesyncd.service",
    "ldconfig.service",
    "kmod-static-nodes.service",
    # Bus-activated by `systemctl poweroff` (its inhibitor check): creates the host's
    # /var/lib/systemd/linger and takes virtual terminals.
    "systemd-logind.service",
)
KEEP_UNITS = frozenset({"systemd-journald.service"})
# Debian packages that bring each program the sandbox needs.
NEEDED = {
    str(SYSTEMD): "systemd",
    "/usr/bin/systemctl": "systemd",
    "/usr/bin/busctl": "systemd",
    "/usr/bin/dbus-daemon": "dbus",
    SANDBOX_PYTHON: "python3",
    "/usr/bin/unshare": "util-linux",
    "/usr/bin/nsenter": "util-linux",
    "/usr/bin/setpriv": "util-linux",
    "/usr/bin/mount": "mount",
}
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


class SandboxUnavailable(RuntimeError):
    """This process may not boot a sandbox (not root): the only reason to skip its tests."""


class SandboxError(RuntimeError):
    """The sandbox cannot boot or misbehaved; the message says why and shows its output."""


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup hierarchy as the host mounts it (v1 controller set, or v2)."""

    mountpoint: Path
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: str  # the -o to mount the same hierarchy again ("memory", "name=systemd", "")

    def sandbox_dir(self, name: str) -> Path:
        return self.mountpoint / name


def check_machine() -> None:
    """Raise SandboxUnavailable when not root, SandboxError naming the Debian packages to install
    when a program is missing."""
    if os.geteuid() != 0:
        raise SandboxUnavailable("booting systemd in a namespace needs root")
    missing = {pkg for path, pkg in NEEDED.items() if not os.access(path, os.X_OK)}
    if missing:
        raise SandboxError(
            f"the systemd sandbox needs the Debian package(s) {', '.join(sorted(missing))} "
            f"(apt-get install {' '.join(sorted(missing))})"
        )


def cgroup_mounts(mountinfo: str | None = None) -> list[CgroupMount]:
    """The cgroup hierarchies mounted at or under /sys/fs/cgroup, from /proc/self/mountinfo."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    found = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        mountpoint, fstype = Path(fields[4]), tail[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        if mountpoint != CGROUP_ROOT and CGROUP_ROOT not in mountpoint.parents:
            continue
        kept = [o for o in tail[2].split(",") if o not in ("rw", "ro") and not o.startswith("release_agent=")]
        found.append(CgroupMount(mountpoint, fstype, ",".join(kept)))
    return found


def units_to_mask() -> list[str]:
    names = set(HOST_UNITS)
    for directory in UNIT_DIRS:
        for target in ("sysinit.target.wants", "local-fs.target.wants"):
            with contextlib.suppress(OSError):
                names.update(p.name for p in (directory / target).iterdir())
    return sorted(names - KEEP_UNITS)


def generators_to_mask() -> list[str]:
    names: set[str] = set()
    for directory in GENERATOR_DIRS:
        with contextlib.suppress(OSError):
            names.update(p.name for p in directory.iterdir())
    return sorted(names)


def boot_script(
    base: Path, mounts: list[CgroupMount], shared: tuple[Path, ...] = (), private: tuple[Path, ...] = ()
) -> str:
    """The script: `outer` joins the sandbox's cgroups and unshares; `inner` (PID 1 of the new
    namespaces) makes the private mounts and the unit directory, then execs systemd."""
    name = base.name
    q = shlex.quote
    # Shared paths are held at a mountpoint of the base directory while /tmp and /run get their
    # tmpfs, then bound back (the mounts are the namespace's own: propagation is private).
    hidden = [p for p in shared if any(p == r or r in p.parents for r in (Path("/tmp"), Path("/run")))]
    held = [(q(str(p)), q(str(base / "shared" / str(n)))) for n, p in enumerate(hidden)]
    hold = "\n".join(f"  mkdir -p {at}\n  mount --bind {path} {at}" for path, at in held)
    bind_back = "\n".join(f"  mkdir -p {path}\n  mount --bind {at} {path}" for path, at in held)
    tmpfs = "\n".join(f"  mount -t tmpfs -o mode=755 tmpfs {q(str(p))}" for p in private)
    join = "\n".join(f"  echo $$ > {q(str(m.sandbox_dir(name) / 'cgroup.procs'))}" for m in mounts)
    remount: list[str] = []
    if all(m.mountpoint != CGROUP_ROOT for m in mounts):
        remount.append(f"  mount -t tmpfs -o mode=755,size=4m tmpfs {CGROUP_ROOT}")
    for m in mounts:
        options = f"-o {q(m.options)} " if m.options else ""
        remount.append(f"  mkdir -p {q(str(m.mountpoint))}")
        remount.append(f"  mount -t {m.fstype} {options}{m.fstype} {q(str(m.mountpoint))}")
    masks = "\n".join(f"  ln -s /dev/null /run/systemd/system/{q(u)}" for u in units_to_mask())
    gens = "\n".join(f"  ln -s /dev/null /run/systemd/system-generators/{q(g)}" for g in generators_to_mask())
    return f"""#!/bin/sh
# The systemd sandbox's boot (tests/systemd_sandbox.py). Run as: sh boot.sh outer
set -eu
if [ "$1" = outer ]; then
{join}
  exec setpriv --pdeathsig KILL unshare --cgroup --pid --fork --mount --uts --ipc --mount-proc \\
    --propagation private /bin/sh {q(str(base / "boot.sh"))} inner
fi
if [ "$1" = inner ]; then
{hold}
  mount -t tmpfs -o mode=1777 tmpfs /tmp
  mount -t tmpfs -o mode=755 tmpfs /run
{bind_back}
{tmpfs}
  if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
  mount --bind {q(str(base / "console.log"))} /dev/console
{chr(10).join(remount)}
  mkdir -p /run/systemd/system /run/systemd/system-generators
  printf '[Unit]\\nDescription=test sandbox\\nWants=dbus.socket systemd-journald.socket\\n' \\
    > /run/systemd/system/sandbox.target
{masks}
{gens}
  exec setpriv --pdeathsig KILL env -i container=opmas-sdtest PATH={ENV["PATH"]} \\
    {SYSTEMD} --system --unit=sandbox.target
fi
echo "usage: boot.sh outer|inner" >&2
exit 2
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _remove_cgroups(name: str, mounts: list[CgroupMount], timeout: float = 5.0) -> list[str]:
    """rmdir the sandbox's cgroup tree in every hierarchy, deepest first; what is left."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for m in mounts:
            top = m.sandbox_dir(name)
            if not top.is_dir():
                continue
            for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    path.rmdir()
            try:
                top.rmdir()
            except OSError as exc:
                left.append(f"{top}: {exc.strerror}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def sweep_stale(mounts: list[CgroupMount]) -> None:
    """Remove what a sandbox left when its process died without stopping it (SIGKILL): its
    directory names its owner's PID, its systemd died with its owner (pdeathsig)."""
    for base in WORK_ROOT.glob(PREFIX + "*"):
        try:
            owner = int((base / "owner").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _alive(owner):
            continue
        pid_file = base / "systemd.pid"
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        _remove_mountpoints(base)
        if not _remove_cgroups(base.name, mounts, timeout=1.0):
            shutil.rmtree(base, ignore_errors=True)


def _make_mountpoints(base: Path, private: tuple[Path, ...]) -> None:
    """Make the private paths missing on the host (empty, named in base/made-dirs for removal)."""
    made = []
    for path in private:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        made += [str(p) for p in missing]
        (base / "made-dirs").write_text("\n".join(made))


def _remove_mountpoints(base: Path) -> None:
    """rmdir what _make_mountpoints made (deepest first; a directory someone filled stays)."""
    with contextlib.suppress(OSError):
        for name in (base / "made-dirs").read_text().splitlines():
            try:
                Path(name).rmdir()
            except OSError as exc:
                log.warning("systemd sandbox: cannot remove the mountpoint %s it made: %s", name, exc)


class SystemdSandbox:
    """systemd as PID 1 of new PID, mount, cgroup, UTS and IPC namespaces (see the module doc)."""

    # What run() enters: the mount, PID, UTS, IPC and cgroup namespaces of its systemd.
    nsenter_flags: tuple[str, ...] = ("-m", "-p", "-u", "-i", "-C")

    def __init__(
        self,
        boot_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        shared: tuple[Path, ...] = (),
        private: tuple[Path, ...] = (),
    ) -> None:
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.shared = shared
        self.private = private
        self.base_dir = Path()
        self.started_at = 0.0  # time.time() of the launch
        self.pid = 0  # systemd's PID as the host sees it
        self.boot_seconds = 0.0  # from the launch to `is-system-running` answering running/degraded
        self.bus_seconds = 0.0  # the first call on the system bus (dbus-daemon socket-activated)
        self.poweroff_seconds = 0.0  # from `systemctl poweroff` to the PID gone
        self.state = ""  # running | degraded
        self.failed_units: list[str] = []
        self._mounts: list[CgroupMount] = []
        self._launcher: subprocess.Popen[bytes] | None = None

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        check_machine()
        self._mounts = cgroup_mounts()
        sweep_stale(self._mounts)
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=WORK_ROOT))
        (self.base_dir / "owner").write_text(str(os.getpid()))
        (self.base_dir / "console.log").touch()
        _LIVE.add(self)
        try:
            self._make_cgroups()
            _make_mountpoints(self.base_dir, self.private)
            script = self._boot_script()
            (self.base_dir / "boot.sh").write_text(script)
            began = time.monotonic()
            self.started_at = time.time()
            with open(self.base_dir / "output.log", "wb") as out:
                self._launcher = subprocess.Popen(
                    ["/bin/sh", str(self.base_dir / "boot.sh"), "outer"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=ENV,
                )
            self.pid = self._find_systemd(began + self.boot_timeout)
            (self.base_dir / "systemd.pid").write_text(str(self.pid))
            self.state = self._wait_running(began + self.boot_timeout)
            self.boot_seconds = time.monotonic() - began
            if self.state == "degraded":
                self.failed_units = self.run(
                    "systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"
                ).stdout.split("\n")
                log.warning("systemd sandbox degraded; failed units: %s", self.failed_units)
            began = time.monotonic()
            self._prove_bus()
            self.bus_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise
        log.info("systemd sandbox PID %d %s in %.3f s", self.pid, self.state, self.boot_seconds)

    def stop(self) -> None:
        """Power off (SIGKILL by PID when that hangs), then remove the cgroups and directory."""
        _LIVE.discard(self)
        if self.pid and _alive(self.pid):
            began = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                # Answers "connection reset" or nothing: the namespace ends under it.
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=5)
            if not self._wait_gone(began + self.stop_timeout):
                log.warning("systemd sandbox PID %d ignored poweroff: SIGKILL", self.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self._wait_gone(time.monotonic() + 5)
            self.poweroff_seconds = time.monotonic() - began
        if self._launcher is not None:
            if self._launcher.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self._launcher.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._launcher.wait(timeout=5)
        left = _remove_cgroups(self.base_dir.name, self._mounts) if self._mounts else []
        _remove_mountpoints(self.base_dir)
        if left:
            log.warning("systemd sandbox left cgroups behind: %s", left)
        elif self.base_dir.name.startswith(PREFIX):
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.pid = 0

    def __enter__(self) -> SystemdSandbox:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- use ----------------------------------------------------------------------------------

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside (nsenter into all its namespaces); SandboxError if check and it fails."""
        if not self.pid:
            raise SandboxError("the systemd sandbox is not running")
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), *self.nsenter_flags, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=ENV,
            check=False,
        )
        if check and result.returncode != 0:
            said = result.stdout + result.stderr
            raise SandboxError(f"{shlex.join(argv)} exited {result.returncode} in the sandbox:\n{said}")
        return result

    @property
    def bus_address(self) -> str:
        """The sandbox's system bus, from the host: its private /run seen through /proc/PID/root."""
        return f"unix:path={self.host_path('/run/dbus/system_bus_socket')}"

    def host_path(self, path: str) -> Path:
        """Where the host sees a path of the sandbox (its own /tmp, /run, /var/log/journal)."""
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def output(self) -> str:
        """What the sandbox printed: the launcher's output and PID 1's console."""
        parts = []
        for name in ("output.log", "console.log"):
            with contextlib.suppress(OSError):
                text = (self.base_dir / name).read_text(errors="replace")
                parts.append(f"--- {name} ---\n{text[-6000:]}")
        return "\n".join(parts)

    # -- boot steps ---------------------------------------------------------------------------

    def _boot_script(self) -> str:
        """The boot script (a subclass boots another way: tests/systemd_root_sandbox.py)."""
        return boot_script(self.base_dir, self._mounts, self.shared, self.private)

    def _make_cgroups(self) -> None:
        for m in self._mounts:
            path = m.sandbox_dir(self.base_dir.name)
            path.mkdir()
            if m.fstype == "cgroup" and (path / "cpuset.cpus").exists():
                # A v1 cpuset cgroup takes no process until it has CPUs and memory nodes.
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (path / key).write_text((m.mountpoint / key).read_text())

    def _find_systemd(self, deadline: float) -> int:
        """The launcher is unshare (after two execs); systemd is its only child, once it exec'd."""
        assert self._launcher is not None
        launcher = self._launcher.pid
        target = os.path.realpath(SYSTEMD)
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise SandboxError(f"the sandbox exited {self._launcher.returncode} at boot\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
                if len(children) == 1 and os.path.realpath(f"/proc/{children[0]}/exe") == target:
                    return int(children[0])
            time.sleep(0.01)
        raise SandboxError(f"systemd did not start within {self.boot_timeout} s\n{self.output()}")

    def _wait_running(self, deadline: float) -> str:
        state = ""
        while time.monotonic() < deadline:
            if not _alive(self.pid):
                raise SandboxError(f"the sandbox's systemd died at boot\n{self.output()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                state = self.run("systemctl", "is-system-running", check=False, timeout=5).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.05)
        jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
        raise SandboxError(
            f"systemd did not come up within {self.boot_timeout} s (is-system-running: {state!r})\n"
            f"jobs:\n{jobs}\n{self.output()}"
        )

    def _prove_bus(self) -> None:
        """Call the manager over the system bus from the host (this socket-activates dbus-daemon)."""
        argv = ["busctl", f"--address={self.bus_address}", "--timeout=10", "get-property",
                "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager", "Version"]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=15, env=ENV, check=False)
        if result.returncode != 0 or not result.stdout.startswith("s "):
            raise SandboxError(
                f"the sandbox's system bus does not answer at {self.bus_address}: "
                f"{result.stdout}{result.stderr}\n{self.output()}"
            )

    def _wait_gone(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if not _alive(self.pid):
                return True
            time.sleep(0.01)
        return not _alive(self.pid)


_LIVE: set[SystemdSandbox] = set()


@atexit.register
def _stop_all() -> None:
    for sandbox in list(_LIVE):
        sandbox.stop()
