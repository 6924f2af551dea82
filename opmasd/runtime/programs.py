"""Whether an agent's program can be executed, told before it is started.

Spawning through a wrapper (the cgroup join, runtime.cgroups) moves the exec into the child,
where a missing program is only an exit status 127. Checking first keeps the operator's error
what a failed exec in the daemon said: the program, and why it cannot run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

from opmasd.core.errors import LaunchError

_SHEBANG_LIMIT = 256


def check_program(command: tuple[str, ...], cwd: str | None, environment: Mapping[str, str]) -> None:
    """LaunchError when command[0] cannot be executed as it would be, with that PATH and cwd."""
    program = command[0]
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.path.exists(path):
            raise LaunchError(not_found(program))
    else:
        found = shutil.which(program, mode=os.F_OK, path=environment.get("PATH", os.defpath))
        if found is None:
            raise LaunchError(not_found(program))
        path = found
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise LaunchError(not_executable(program))
    interpreter = _interpreter(path)
    if interpreter is not None and not os.path.exists(interpreter):
        raise LaunchError(f"program {program!r}: its script interpreter {interpreter!r} is missing")


def not_found(program: str) -> str:
    """What a failed exec with ENOENT says, here or from a spawn in the daemon."""
    return f"program {program!r} not found (or its script interpreter is missing)"


def not_executable(program: str) -> str:
    """What a failed exec with EACCES says."""
    return f"program {program!r} is not executable (permission denied)"


def _interpreter(path: str) -> str | None:
    """The #! interpreter of a script; None for a binary or an unreadable file."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SHEBANG_LIMIT)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None
