"""The agent spec flags of `agents register` and `agents update`, and the AgentSpec they build.

With the spec comes the list of update_mask paths the given flags name (for `update`)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Container

from opmas.units import parse_percent
from opmas.v1 import agents_pb2
from opmasctl.parsing import (
    argtype,
    enum_choices,
    parse_duration,
    parse_env,
    parse_labels,
    parse_size,
)

RESTART_POLICIES = enum_choices(agents_pb2.RestartPolicy.items(), "RESTART_POLICY_")
RUNTIMES = enum_choices(agents_pb2.RuntimeKind.items(), "RUNTIME_KIND_")
# The spec's Duration fields, each a --field-name SECONDS flag.
DURATION_FIELDS: dict[str, str] = {
    "stop_timeout": "grace period between SIGTERM and SIGKILL",
    "heartbeat_interval": "how often the agent heartbeats; 3 missed make it inactive",
    "start_seconds": "how long a new process must stay up to count as started (0: at once; default 1s)",
}


class SpecError(ValueError):
    """Spec flags that cannot be combined; reported as a usage error."""


def add_spec_arguments(parser: argparse.ArgumentParser, *, update: bool) -> None:
    # Every default is None so that "not given" is distinguishable from "given as empty/false":
    # update sends exactly the given fields in its update_mask.
    group = parser.add_argument_group("agent spec")
    group.add_argument("--name", dest="spec_name", metavar="NAME")
    group.add_argument("--type", dest="spec_type", metavar="TYPE")
    group.add_argument("--version", dest="spec_version", metavar="VERSION")
    group.add_argument("--description", dest="spec_description", metavar="TEXT")
    group.add_argument(
        "--command",
        dest="spec_command",
        metavar="CMD",
        help='program and arguments as one shell-quoted string, e.g. "python -m sysmon -v"; '
        "or give them after --",
    )
    group.add_argument("--workdir", dest="spec_workdir", metavar="DIR", help="working directory")
    group.add_argument(
        "--env",
        dest="spec_env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable (repeatable)"
        + ("; adds or overrides it, the others are kept (as kubectl set env)" if update else ""),
    )
    if update:
        group.add_argument(
            "--unset-env",
            dest="spec_unset_env",
            action="append",
            metavar="KEY",
            help="remove this environment variable (repeatable)",
        )
        group.add_argument(
            "--replace-env",
            dest="spec_replace_env",
            action="store_true",
            help="the --env given become the whole environment (alone: remove every variable)",
        )
        group.add_argument(
            "--clear-env", dest="spec_clear_env", action="store_true", help="remove every variable"
        )
    group.add_argument(
        "--label",
        dest="spec_label",
        action="append",
        metavar="KEY=VALUE",
        help="label, for selectors such as -l KEY=VALUE (repeatable)"
        + ("; adds or overrides it, the others are kept" if update else ""),
    )
    if update:
        group.add_argument(
            "--unset-label",
            dest="spec_unset_label",
            action="append",
            metavar="KEY",
            help="remove this label (repeatable)",
        )
        group.add_argument(
            "--replace-labels",
            dest="spec_replace_labels",
            action="store_true",
            help="the --label given become all the labels (alone: remove every label)",
        )
    group.add_argument("--restart-policy", dest="spec_restart_policy", choices=sorted(RESTART_POLICIES))
    for field, help_text in DURATION_FIELDS.items():
        group.add_argument(
            f"--{field.replace('_', '-')}",
            dest=f"spec_{field}",
            type=argtype(parse_duration),
            metavar="SECONDS",
            help=help_text,
        )
    group.add_argument("--runtime", dest="spec_runtime", choices=sorted(RUNTIMES))
    group.add_argument(
        "--autostart",
        dest="spec_autostart",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start when registered or discovered",
    )
    group.add_argument(
        "--restart-on-inactive",
        dest="spec_restart_on_inactive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restart when the heartbeat is lost",
    )
    group.add_argument(
        "--memory-max",
        dest="spec_memory_max",
        type=argtype(parse_size),
        metavar="BYTES",
        help="memory limit: bytes, or 512K, 512M, 1G (0: none)",
    )
    group.add_argument(
        "--cpu-quota",
        dest="spec_cpu_quota",
        type=argtype(parse_percent),
        metavar="PERCENT",
        help="percent of one CPU; 200 means two CPUs",
    )
    group.add_argument("--tasks-max", dest="spec_tasks_max", type=int, metavar="N")
    group.add_argument("--open-files-max", dest="spec_open_files_max", type=int, metavar="N")


def build_spec(
    args: argparse.Namespace, argv_after_dashes: list[str]
) -> tuple[agents_pb2.AgentSpec, list[str]]:
    """The AgentSpec of the given flags and the AgentSpec field paths they set, in proto order."""
    spec = agents_pb2.AgentSpec()
    paths: list[str] = []

    def given(name: str) -> bool:
        return getattr(args, name, None) is not None

    for flag, field in (
        ("spec_name", "name"),
        ("spec_type", "type"),
        ("spec_version", "version"),
        ("spec_description", "description"),
    ):
        if given(flag):
            setattr(spec, field, getattr(args, flag))
            paths.append(field)

    command = _command(args.spec_command, argv_after_dashes)
    if command is not None:
        spec.command.extend(command)
        paths.append("command")
    if given("spec_workdir"):
        spec.working_directory = args.spec_workdir
        paths.append("working_directory")
    if getattr(args, "spec_clear_env", False) and given("spec_env"):
        raise SpecError("--clear-env and --env cannot be combined")
    replacing = getattr(args, "spec_replace_env", False) or getattr(args, "spec_clear_env", False)
    if replacing and given("spec_unset_env"):
        raise SpecError("--unset-env has nothing to remove from an environment that is replaced")
    if given("spec_env"):
        try:
            spec.environment.update(parse_env(args.spec_env))
        except ValueError as err:
            raise SpecError(str(err)) from None
        _set_and_unset(spec.environment, getattr(args, "spec_unset_env", None), "env")
        paths.append("environment")
    elif replacing or given("spec_unset_env"):
        paths.append("environment")
    replacing_labels = getattr(args, "spec_replace_labels", False)
    if replacing_labels and given("spec_unset_label"):
        raise SpecError("--unset-label has nothing to remove from labels that are replaced")
    if given("spec_label"):
        try:
            spec.labels.update(parse_labels(args.spec_label))
        except ValueError as err:
            raise SpecError(str(err)) from None
        _set_and_unset(spec.labels, getattr(args, "spec_unset_label", None), "label")
        paths.append("labels")
    elif replacing_labels or given("spec_unset_label"):
        paths.append("labels")
    if given("spec_restart_policy"):
        spec.restart_policy = RESTART_POLICIES[args.spec_restart_policy]
        paths.append("restart_policy")
    for field in DURATION_FIELDS:
        if given(f"spec_{field}"):
            getattr(spec, field).CopyFrom(getattr(args, f"spec_{field}"))
            paths.append(field)
    for flag, field in (
        ("spec_memory_max", "memory_max_bytes"),
        ("spec_cpu_quota", "cpu_quota_percent"),
        ("spec_tasks_max", "tasks_max"),
        ("spec_open_files_max", "open_files_max"),
    ):
        if given(flag):
            try:
                setattr(spec.resources, field, getattr(args, flag))
            except ValueError as err:
                # e.g. a negative --tasks-max into a uint32 field.
                raise SpecError(f"--{flag.removeprefix('spec_').replace('_', '-')}: {err}") from None
            paths.append(f"resources.{field}")
    if given("spec_runtime"):
        spec.runtime = RUNTIMES[args.spec_runtime]
        paths.append("runtime")
    if given("spec_autostart"):
        spec.autostart = args.spec_autostart
        paths.append("autostart")
    if given("spec_restart_on_inactive"):
        spec.restart_on_inactive = args.spec_restart_on_inactive
        paths.append("restart_on_inactive")
    return spec, paths


def environment_patch(args: argparse.Namespace) -> tuple[dict[str, str], list[str]] | None:
    """For `update`: the variables to set and to remove when the environment is edited rather
    than replaced (None: it is replaced, or not touched). The caller merges them into the
    agent's current environment."""
    sets = getattr(args, "spec_env", None) or []
    unsets = getattr(args, "spec_unset_env", None) or []
    replacing = getattr(args, "spec_replace_env", False) or getattr(args, "spec_clear_env", False)
    if replacing or not (sets or unsets):
        return None
    return parse_env(sets), list(unsets)


def _set_and_unset(sets: Container[str], unsets: list[str] | None, what: str) -> None:
    both = sorted(key for key in unsets or () if key in sets)
    if both:
        raise SpecError(f"--{what} and --unset-{what} both name {', '.join(both)}: say which")


def labels_patch(args: argparse.Namespace) -> tuple[dict[str, str], list[str]] | None:
    """For `update`: the labels to set and to remove when they are edited rather than replaced
    (None: replaced, or not touched); merged by the caller into the agent's current labels."""
    sets = getattr(args, "spec_label", None) or []
    unsets = getattr(args, "spec_unset_label", None) or []
    if getattr(args, "spec_replace_labels", False) or not (sets or unsets):
        return None
    return parse_labels(sets), list(unsets)


def _command(flag: str | None, after_dashes: list[str]) -> list[str] | None:
    if flag is not None and after_dashes:
        raise SpecError("give the command either with --command or after --, not both")
    if after_dashes:
        return after_dashes
    if flag is None:
        return None
    try:
        argv = shlex.split(flag)
    except ValueError as err:
        raise SpecError(f"invalid --command {flag!r}: {err}") from None
    if not argv:
        raise SpecError("--command is empty")
    return argv
