"""systemd 252 booted as PID 1 with a clean Debian 12 root as its /, for the package tests (issue 14).

A sibling of tests/systemd_sandbox.py (read its docstring first): the same outer launcher (the
sandbox's own cgroups at the root of each hierarchy, `unshare --cgroup --pid --mount --uts --ipc`
with private propagation, systemd under pdeathsig, `container=opmas-sdtest`), the same stop,
sweep and masks, but the filesystem is not the host's:

- the root: `mmdebstrap --variant=minbase` of bookworm with systemd, dbus, python3.11, ... (ROOT_PACKAGES
  plus what the caller names: the .deb's Depends), cached as a tarball outside the clone,
  /var/cache/opmas-tests/debian-root-<hash of the recipe>.tar (built under a lock when missing;
  a changed recipe is a new name), unpacked per sandbox into its directory under /var/tmp;
- the inner script builds the root's mounts (a bind of the root onto itself, proc of the new PID
  namespace, a sysfs of its own, read-only, with the sandbox's cgroup hierarchies on a tmpfs at
  /sys/fs/cgroup, a /dev tmpfs with only null, zero, full, random, urandom, tty, a private
  devpts and /dev/console bound to the sandbox's console.log, private /tmp and /run), then
  pivot_root into it and detaches the host's tree: what the units inside do reaches neither the
  host's files nor its /dev nodes or ports (the kernel is shared: the sandbox's cgroup subtrees,
  a read-only sysfs);
- its own network namespace (`--net`, loopback up): opmasd.socket's 127.0.0.1:8000 and the
  embedded NATS's ports do not collide with the host's or another sandbox's.

The root is a scratch copy, so dpkg and the maintainer scripts (sysusers, tmpfiles) act on it
only. The masks are the parent's (every unit that sysinit.target and local-fs.target pull in, the
generators), read from the root's own unit directories: several of those units act on the kernel
(sysctl, modules, binfmt, remount), which the root shares. A package's Depends already in the
base root (ROOT_PACKAGES and what they pull in) use it; others make a root of their own. run()
enters all of its namespaces and its root (`nsenter -r -w`); host_path() reaches its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from systemd_sandbox import (
    CGROUP_ROOT,
    ENV,
    GENERATOR_DIRS,
    HOST_UNITS,
    KEEP_UNITS,
    SYSTEMD,
    UNIT_DIRS,
    CgroupMount,
    SandboxError,
    SandboxUnavailable,
    SystemdSandbox,
)

log = logging.getLogger(__name__)

CACHE_DIR = Path("/var/cache/opmas-tests")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# systemd and dbus boot it; python3.11 is what the package's venv runs on; init-system-helpers
# brings deb-systemd-helper/-invoke for the maintainer scripts; passwd (useradd) and util-linux
# (setpriv) run commands as other users; procps for ps in failure reports.
ROOT_PACKAGES = ("systemd", "dbus", "python3.11", "init-system-helpers", "passwd", "util-linux", "procps")
# Raised when the recipe's meaning changes without its inputs changing (the hook below, say).
RECIPE_VERSION = 1
BUILD_TIMEOUT = 900.0
# A root no test used for this long (an older recipe) is deleted when another is built.
PRUNE_DAYS = 7
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


def recipe(extra: Iterable[str] = ()) -> dict[str, object]:
    """What the root is made of: its hash names the cached tarball."""
    packages = sorted({*ROOT_PACKAGES, *extra})
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "variant": "minbase",
        "packages": packages,
    }


def tarball_path(extra: Iterable[str] = ()) -> Path:
    digest = hashlib.sha256(json.dumps(recipe(extra), sort_keys=True).encode()).hexdigest()[:16]
    return CACHE_DIR / f"debian-root-{digest}.tar"


def debian_root(extra: Iterable[str] = ()) -> Path:
    """The cached root with ROOT_PACKAGES and `extra` (a package's Depends): the base root when it
    has them all already (libc6, systemd, ...), one of its own with the missing ones otherwise.

    SandboxUnavailable when not root or mmdebstrap is absent (.ci/run installs it); SandboxError
    with mmdebstrap's output when the build fails (no mirror, an unknown package)."""
    base = _cached_root(())
    missing = set(extra) - installed(base)
    return _cached_root(sorted(missing)) if missing else base


def installed(tarball: Path) -> set[str]:
    """The packages dpkg lists as installed in a root tarball (its /var/lib/dpkg/status)."""
    result = subprocess.run(
        ["tar", "-xOf", str(tarball), "./var/lib/dpkg/status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise SandboxError(f"no dpkg status in {tarball}: {result.stderr[-1000:]}")
    return {
        line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("Package:")
    }


def _prune(keep: Path) -> None:
    """Remove the roots of other recipes unused for PRUNE_DAYS (each use touches its tarball)."""
    for old in CACHE_DIR.glob("debian-root-*.tar"):
        try:
            if old != keep and time.time() - old.stat().st_mtime > PRUNE_DAYS * 86400:
                old.unlink()
                old.with_suffix(".lock").unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot prune the cached root %s: %s", old, exc)


def _cached_root(extra: Iterable[str]) -> Path:
    """The cached root tarball for this recipe, built (under a lock: one build at a time) when missing."""
    if os.geteuid() != 0:
        raise SandboxUnavailable("building a Debian root and booting systemd in it needs root")
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise SandboxUnavailable("mmdebstrap is not installed (apt-get install mmdebstrap; .ci/run does)")
    path = tarball_path(extra)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            os.utime(path)  # in use: not pruned
            return path
        partial = path.with_suffix(".tar.partial")
        conf = recipe(extra)
        packages = conf["packages"]
        assert isinstance(packages, list)
        argv = [
            tool, "--variant=minbase", f"--include={','.join(packages)}",
            '--aptopt=Acquire::Check-Valid-Until "false"',
            # No apt lists or package cache in the tarball: smaller, and nothing inside downloads.
            "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*.bin",
            "--format=tar", SUITE, str(partial), MIRROR,
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise SandboxError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
        partial.rename(path)
    _prune(path)
    return path


def depends_names(field: str) -> tuple[str, ...]:
    """The package names of a Depends field: the first of each alternative, no version, no :arch."""
    names = (re.split(r"[\s(:]", part.split("|")[0].strip())[0] for part in field.split(","))
    return tuple(sorted({n for n in names if n}))


def higher(version: str) -> str:
    """A version dpkg orders after `version`: its last number plus one (0.1.0 -> 0.1.1)."""
    head, _, last = version.rpartition(".")
    number = re.match(r"\d+", last)
    return f"{head}.{int(number.group()) + 1}" if head and number else f"{version}.1"


def _masks(root: Path) -> tuple[list[str], list[str]]:
    """Units and generators to mask, from the root's own directories (not the host's)."""
    units = set(HOST_UNITS)
    for directory in UNIT_DIRS:
        for target in ("sysinit.target.wants", "local-fs.target.wants"):
            with contextlib.suppress(OSError):
                units.update(p.name for p in (root / directory.relative_to("/") / target).iterdir())
    generators: set[str] = set()
    for directory in GENERATOR_DIRS:
        with contextlib.suppress(OSError):
            generators.update(p.name for p in (root / directory.relative_to("/")).iterdir())
    return sorted(units - KEEP_UNITS), sorted(generators)


def root_boot_script(base: Path, root: Path, mounts: list[CgroupMount]) -> str:
    """`outer` joins the sandbox's cgroups and unshares (a network namespace too); `inner` mounts
    the root's filesystems, pivots into it and execs the root's systemd."""
    name = base.name
    q = shlex.quote
    r = q(str(root))
    join = "\n".join(f"  echo $$ > {q(str(m.sandbox_dir(name) / 'cgroup.procs'))}" for m in mounts)
    cgroups = []
    if all(m.mountpoint != CGROUP_ROOT for m in mounts):
        cgroups.append(f"  mount -t tmpfs -o mode=755,size=4m tmpfs {r}/sys/fs/cgroup")
    for m in mounts:
        at = q(str(root / m.mountpoint.relative_to("/")))
        options = f"-o {q(m.options)} " if m.options else ""
        cgroups.append(f"  mkdir -p {at}")
        cgroups.append(f"  mount -t {m.fstype} {options}{m.fstype} {at}")
    devs = "\n".join(f"  touch {r}/dev/{n}; mount --bind /dev/{n} {r}/dev/{n}" for n in DEV_NODES)
    units, generators = _masks(root)
    masks = "\n".join(f"  ln -s /dev/null {r}/run/systemd/system/{q(u)}" for u in units)
    gens = "\n".join(f"  ln -s /dev/null {r}/run/systemd/system-generators/{q(g)}" for g in generators)
    return f"""#!/bin/sh
# The clean-root systemd sandbox's boot (tests/systemd_root_sandbox.py). Run as: sh boot.sh outer
set -eu
if [ "$1" = outer ]; then
{join}
  exec setpriv --pdeathsig KILL unshare --cgroup --pid --fork --mount --uts --ipc --net \\
    --propagation private /bin/sh {q(str(base / "boot.sh"))} inner
fi
if [ "$1" = inner ]; then
  ip link set lo up
  mount --bind {r} {r}
  mount -t proc proc {r}/proc
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {r}/sys
{chr(10).join(cgroups)}
  mount -t tmpfs -o mode=755,size=1m tmpfs {r}/dev
{devs}
  mkdir -p {r}/dev/pts {r}/dev/shm
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts {r}/dev/pts
  ln -s pts/ptmx {r}/dev/ptmx
  mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm
  touch {r}/dev/console
  mount --bind {q(str(base / "console.log"))} {r}/dev/console
  mount -t tmpfs -o mode=1777 tmpfs {r}/tmp
  mount -t tmpfs -o mode=755 tmpfs {r}/run
  mkdir -p {r}/run/systemd/system {r}/run/systemd/system-generators
  printf '[Unit]\\nDescription=test sandbox\\nWants=dbus.socket systemd-journald.socket\\n' \\
    > {r}/run/systemd/system/sandbox.target
{masks}
{gens}
  cd {r}
  mkdir -p .oldroot
  pivot_root . .oldroot
  umount -l /.oldroot
  rmdir /.oldroot
  exec setpriv --pdeathsig KILL env -i container=opmas-sdtest PATH={ENV["PATH"]} \\
    {SYSTEMD} --system --unit=sandbox.target
fi
echo "usage: boot.sh outer|inner" >&2
exit 2
"""


class RootedSystemdSandbox(SystemdSandbox):
    """A SystemdSandbox whose / is a fresh copy of the cached Debian root `tarball` (module doc)."""

    # Its namespaces (the network one too), its root and its working directory.
    nsenter_flags = ("-m", "-p", "-u", "-i", "-C", "-n", "-r", "-w")

    def __init__(self, tarball: Path, boot_timeout: float = 30.0, stop_timeout: float = 15.0) -> None:
        super().__init__(boot_timeout=boot_timeout, stop_timeout=stop_timeout)
        self.tarball = tarball
        self.unpack_seconds = 0.0

    @property
    def root(self) -> Path:
        """The root as the host sees it before boot (its unpacked copy under base_dir)."""
        return self.base_dir / "root"

    def _boot_script(self) -> str:
        began = time.monotonic()
        self.root.mkdir()
        unpack = ["tar", "-x", "--numeric-owner", "--xattrs", "-f", str(self.tarball), "-C", str(self.root)]
        result = subprocess.run(unpack, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise SandboxError(f"unpacking {self.tarball} failed: {result.stderr[-2000:]}")
        self.unpack_seconds = time.monotonic() - began
        return root_boot_script(self.base_dir, self.root, self._mounts)
