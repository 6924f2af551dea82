"""Checks an agent spec before the manager accepts it (the id grammar is core.ids).

Every problem is reported as a FieldViolation naming the field, all of them at once, so an
operator fixes a manifest or a request in one go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from opmasd.core.errors import FieldViolation, InvalidArgument
from opmasd.core.labels import label_errors
from opmasd.core.model import AgentSpec
from opmasd.core.privileges import capability_errors, sandbox_errors

ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME_LENGTH = 128
MAX_ARGUMENTS = 1024
MAX_ARGUMENT_LENGTH = 8192
MAX_ENVIRONMENT = 512
MAX_ENV_NAME_LENGTH = 256
MAX_ENV_VALUE_LENGTH = 32 * 1024
MAX_PATH_LENGTH = 4096
MAX_SPEC_BYTES = 128 * 1024
# A start window longer than an hour is a typo, not a plan.
MAX_START_SECONDS = 3600.0
# A stop timeout or heartbeat interval past a day would overflow clients' deadlines.
MAX_INTERVAL_SECONDS = 86400.0
# type and version are labels (the type is a column of its own); a description is prose.
MAX_LABEL_LENGTH = 64
MAX_DESCRIPTION_LENGTH = 1024


def resolve_program(spec: AgentSpec) -> str | None:
    """The absolute path of the spec's program, or None when it cannot be found."""
    if not spec.command:
        return None
    program = spec.command[0]
    if "/" in program:
        path = Path(program)
        if not path.is_absolute():
            if not spec.working_directory:
                return None
            path = Path(spec.working_directory) / path
        return str(path) if _is_executable_file(path) else None
    search_path = spec.env.get("PATH", os.environ.get("PATH", os.defpath))
    try:
        return shutil.which(program, path=search_path)
    except (OSError, ValueError):  # a name too long for the file system, a NUL
        return None


# A path the file system refuses to look up (a component over 255 bytes, a NUL) is simply not
# there: a field error, never an exception out of validation.
def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _is_executable_file(path: Path) -> bool:
    try:
        return path.is_file() and os.access(path, os.X_OK)
    except (OSError, ValueError):
        return False


def spec_violations(spec: AgentSpec, prefix: str = "spec.") -> list[FieldViolation]:
    """Everything wrong with spec; empty when it is valid."""
    out: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        # An empty field is the spec as a whole.
        out.append(FieldViolation(prefix + field if field else prefix.rstrip(".") or "spec", description))

    if not spec.name.strip():
        bad("name", "must not be empty")
    elif len(spec.name) > MAX_NAME_LENGTH:
        bad("name", f"must be at most {MAX_NAME_LENGTH} characters")
    elif any(ord(c) < 32 for c in spec.name):
        bad("name", "must not contain control characters")
    # Checked here, not left to the database: SQLite would store any length, PostgreSQL refuse
    # it, and both must refuse the same inputs.
    for name, value, limit in (
        ("type", spec.type, MAX_LABEL_LENGTH),
        ("version", spec.version, MAX_LABEL_LENGTH),
        ("description", spec.description, MAX_DESCRIPTION_LENGTH),
    ):
        if len(value) > limit:
            bad(name, f"must be at most {limit} characters, got {len(value)}")
        elif any(ord(c) < 32 and c not in ("\t", "\n") for c in value) or (
            name != "description" and "\n" in value
        ):
            bad(name, "must not contain control characters")

    if spec.working_directory:
        if not Path(spec.working_directory).is_absolute():
            bad("working_directory", f"{spec.working_directory!r} must be an absolute path")
        elif not _is_dir(Path(spec.working_directory)):
            bad("working_directory", f"{spec.working_directory!r} is not an existing directory")

    if not spec.command or not spec.command[0]:
        bad("command", "must name the program to run")
    elif resolve_program(spec) is None:
        program = spec.command[0]
        if "/" in program and not Path(program).is_absolute() and not spec.working_directory:
            bad("command", f"program {program!r} is a relative path and no working_directory is set")
        else:
            bad("command", f"program {program!r} does not exist or is not executable")

    if len(spec.command) > MAX_ARGUMENTS:
        bad("command", f"has {len(spec.command)} arguments; at most {MAX_ARGUMENTS}")
    elif any(len(arg) > MAX_ARGUMENT_LENGTH for arg in spec.command):
        bad("command", f"an argument is over {MAX_ARGUMENT_LENGTH} characters")
    if len(spec.environment) > MAX_ENVIRONMENT:
        bad("environment", f"has {len(spec.environment)} variables; at most {MAX_ENVIRONMENT}")
    elif any(len(k) > MAX_ENV_NAME_LENGTH or len(v) > MAX_ENV_VALUE_LENGTH for k, v in spec.environment):
        bad(
            "environment",
            f"names are at most {MAX_ENV_NAME_LENGTH} and values {MAX_ENV_VALUE_LENGTH} characters",
        )
    if len(spec.working_directory) > MAX_PATH_LENGTH:
        bad("working_directory", f"must be at most {MAX_PATH_LENGTH} characters")
    if not out:
        # The whole spec too, so that a page of ListAgents (pages are byte-bounded as well)
        # and every stored row stay small whatever the mix of fields.
        size = len(json.dumps(spec.to_dict()))
        if size > MAX_SPEC_BYTES:
            bad("", f"the spec is {size} bytes as JSON; at most {MAX_SPEC_BYTES}")
    if any("\0" in arg for arg in spec.command[1:]):
        bad("command", "arguments must not contain NUL characters")
    for key, value in spec.environment:
        if not ENV_NAME_PATTERN.match(key):
            bad("environment", f"{key!r} is not a valid environment variable name")
        elif "\0" in value:
            bad("environment", f"the value of {key} must not contain NUL characters")

    for problem in label_errors(spec.label_map):
        bad("labels", problem)
    for problem in capability_errors(spec.capabilities):
        bad("capabilities", problem)
    for name, problem in sandbox_errors(spec.sandbox):
        bad(f"sandbox.{name}", problem)

    durations: tuple[tuple[str, float], ...] = (
        ("stop_timeout", spec.stop_timeout),
        ("heartbeat_interval", spec.heartbeat_interval),
    )
    for name, seconds in durations:
        if seconds < 0:
            bad(name, f"must not be negative, got {seconds:g}s")
        elif seconds > MAX_INTERVAL_SECONDS:
            bad(name, f"must be at most {MAX_INTERVAL_SECONDS:g}s (a day), got {seconds:g}s")
    if not 0 <= spec.start_seconds <= MAX_START_SECONDS:
        bad("start_seconds", f"must be between 0 and {MAX_START_SECONDS:g}s, got {spec.start_seconds:g}s")
    res = spec.resources
    if res.memory_max_bytes < 0:
        bad("resources.memory_max_bytes", "must not be negative")
    if res.cpu_quota_percent < 0:
        bad("resources.cpu_quota_percent", "must not be negative")
    if res.tasks_max < 0:
        bad("resources.tasks_max", "must not be negative")
    if res.open_files_max < 0:
        bad("resources.open_files_max", "must not be negative")
    return out


def check_spec(spec: AgentSpec, prefix: str = "spec.") -> None:
    violations = spec_violations(spec, prefix)
    if violations:
        raise InvalidArgument(violations)


def check_grace(timeout: float | None) -> None:
    """A stop's own wait before SIGKILL: bounded as a spec's stop_timeout is (the agent's lock
    is held that long, and everything else on the agent waits for it)."""
    if timeout is not None and not 0 <= timeout <= MAX_INTERVAL_SECONDS:
        raise InvalidArgument.single(
            "timeout", f"must be between 0 and {MAX_INTERVAL_SECONDS:g}s (a day), got {timeout:g}s"
        )
