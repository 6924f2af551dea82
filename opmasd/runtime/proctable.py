"""Who is whose child, read from /proc once and shared by every stop that needs it.

Finding an agent's descendants means knowing every process's parent. psutil's
children(recursive=True) reads all of /proc for each call, so stopping 200 agents at once read
/proc 200 times, on the event loop, and took seconds. One snapshot (a parent → children map,
from /proc/<pid>/stat only) serves every stop within max_age of it.

The kernel's /proc/<pid>/task/<tid>/children would avoid the scan, but it needs
CONFIG_PROC_CHILDREN, which not every kernel has (this project's machines do not).
"""

from __future__ import annotations

import os
import time

import psutil

_SNAPSHOT_MAX_AGE = 0.25


class ProcessTable:
    def __init__(self, max_age: float = _SNAPSHOT_MAX_AGE) -> None:
        self._max_age = max_age
        self._children: dict[int, list[int]] = {}
        self._taken = float("-inf")

    def descendants(self, pid: int, fresh: bool = False) -> list[psutil.Process]:
        """pid's descendants (children first), as psutil handles that are safe against reuse."""
        if fresh or time.monotonic() - self._taken > self._max_age:
            self._scan()
        found: list[psutil.Process] = []
        pending = list(self._children.get(pid, ()))
        while pending:
            child = pending.pop(0)
            try:
                found.append(psutil.Process(child))
            except psutil.NoSuchProcess:
                continue  # gone since the snapshot; its children were reparented anyway
            pending.extend(self._children.get(child, ()))
        return found

    def _scan(self) -> None:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # ended while we looked
            # The command name may hold spaces and parentheses: fields resume after the last ')'.
            fields = stat[stat.rfind(b")") + 2 :].split(b" ", 2)
            children.setdefault(int(fields[1]), []).append(int(name))
        self._children = children
        self._taken = time.monotonic()
