"""The agent spec flags of `agents register` and `agents update`, and the AgentSpec they build.

With the spec comes the list of update_mask paths the given flags name (for `update`)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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
from opmasctl.spec_privileges import PrivilegeFlagError, add_privilege_arguments, apply_privilege_flags

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


@dataclass(frozen=True)
class MapFlags:
    """A map field of the spec and its flags: --FLAG K=V to set a key, and for `update`
    --unset-FLAG K to remove one and --REPLACE to make the given keys the whole map."""

    flag: str  # env, label
    field: str  # environment, labels
    replace: str  # replace-env, replace-labels
    parse: Callable[[Iterable[str]], dict[str, str]]
    help: str

    def sets(self, args: argparse.Namespace) -> list[str]:
        return list(getattr(args, f"spec_{self.flag}", None) or [])

    def unsets(self, args: argparse.Namespace) -> list[str]:
        return list(getattr(args, f"spec_unset_{self.flag}", None) or [])

    def replacing(self, args: argparse.Namespace) -> bool:
        replace = bool(getattr(args, "spec_" + self.replace.replace("-", "_"), False))
        # --clear-env, the older spelling of --replace-env alone.
        return replace or (self.flag == "env" and bool(getattr(args, "spec_clear_env", False)))

    def named(self, args: argparse.Namespace, spec: agents_pb2.AgentSpec) -> bool:
        """Put the keys given into spec; whether the field is named at all (for the mask)."""
        sets, unsets = self.sets(args), self.unsets(args)
        if self.replacing(args) and unsets:
            raise SpecError(f"--unset-{self.flag} has nothing to remove: the whole {self.field} is replaced")
        try:
            given = self.parse(sets)
        except ValueError as err:
            raise SpecError(str(err)) from None
        both = sorted(key for key in unsets if key in given)
        if both:
            raise SpecError(f"--{self.flag} and --unset-{self.flag} both name {', '.join(both)}: say which")
        getattr(spec, self.field).update(given)
        return bool(sets or unsets or self.replacing(args))


MAPS = (
    MapFlags("env", "environment", "replace-env", parse_env, "environment variable"),
    MapFlags("label", "labels", "replace-labels", parse_labels, "label, for selectors such as -l KEY=VALUE"),
)


def _add_map_flags(group: argparse._ArgumentGroup, kind: MapFlags, update: bool) -> None:
    group.add_argument(
        f"--{kind.flag}",
        dest=f"spec_{kind.flag}",
        action="append",
        metavar="KEY=VALUE",
        help=f"{kind.help} (repeatable)" + ("; adds or overrides it, the others are kept" if update else ""),
    )
    if update:
        group.add_argument(
            f"--unset-{kind.flag}",
            dest=f"spec_unset_{kind.flag}",
            action="append",
            metavar="KEY",
            help=f"remove KEY from the {kind.field} (repeatable)",
        )
        group.add_argument(
            f"--{kind.replace}",
            dest="spec_" + kind.replace.replace("-", "_"),
            action="store_true",
            help=f"the --{kind.flag} given become the whole {kind.field} (alone: remove every key)",
        )


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
        "--user", dest="spec_user", metavar="USER", help="run as this user (name or uid; opmasd must be root)"
    )
    group.add_argument(
        "--group", dest="spec_group", metavar="GROUP", help="run as this group (default: the user's own)"
    )
    add_privilege_arguments(group, update=update)
    for kind in MAPS:
        _add_map_flags(group, kind, update)
    if update:
        group.add_argument(
            "--clear-env", dest="spec_clear_env", action="store_true", help="remove every variable"
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
    for field in ("user", "group"):
        if given(f"spec_{field}"):
            setattr(spec, field, getattr(args, f"spec_{field}"))
            paths.append(field)
    if getattr(args, "spec_clear_env", False) and given("spec_env"):
        raise SpecError("--clear-env and --env cannot be combined")
    for kind in MAPS:
        if kind.named(args, spec):
            paths.append(kind.field)
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
    try:
        paths += apply_privilege_flags(args, spec)
    except PrivilegeFlagError as err:
        raise SpecError(str(err)) from None
    return spec, paths


def map_patches(args: argparse.Namespace) -> list[tuple[str, dict[str, str], list[str]]]:
    """For `update`: each map (environment, labels) edited rather than replaced, as (field, keys
    to set, keys to remove); the caller merges them into the agent's current map."""
    patches = []
    for kind in MAPS:
        sets, unsets = kind.sets(args), kind.unsets(args)
        if not kind.replacing(args) and (sets or unsets):
            patches.append((kind.field, kind.parse(sets), unsets))
    return patches


def environment_patch(args: argparse.Namespace) -> tuple[dict[str, str], list[str]] | None:
    """map_patches' environment part (None: replaced, or not touched)."""
    found = [(sets, unsets) for field, sets, unsets in map_patches(args) if field == "environment"]
    return found[0] if found else None


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
