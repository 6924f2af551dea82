"""Hypothesis strategies for test_fuzz.py: AgentService requests, byte mutations, NATS payloads.

Requests are built field by field. Each field is plausible three times in four (so that a
request gets past its first check to the ones behind it, and some are accepted and change
things) and otherwise wild: strings with NUL, control characters, astral or huge text;
integers at the int32, int64 and uint64 edges; NaN and infinities; open enums far outside
their values; durations with mixed signs and out-of-range nanos; Struct params nested past the
server's limit; maps with bad keys. `raw_requests` damages valid requests instead (bits
flipped, bytes inserted and cut, fields appended) so that the server also sees bytes no
protobuf library writes. The NATS payloads are the §5 JSON shapes with each field missing, of
the wrong type, at its edge, or not JSON at all.

Nothing here runs a program chosen at random: a spec's program is one of a few harmless ones
(true, false, echo, sleep) or a name no program on this host has, so a spec the daemon accepts
and starts does nothing but exit or sleep until the test deletes it.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

from opmas.v1 import agents_pb2 as pb
from opmasd.api.convert import SPEC_MASK_PATHS
from opmasd.manager.packages.manifest import KNOWN_KEYS

from .test_bad_input import _field, _varint

T = TypeVar("T")


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each as often as its weight says (st.one_of picks its branches
    evenly, and counts the same strategy given twice once)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


def mix(plausible: st.SearchStrategy[T], wild: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return weighted((3, plausible), (1, wild))


# -- scalars ------------------------------------------------------------------------------------

INT32_EDGES = (-(2**31), -1, 0, 1, 2**31 - 1)
INT64_EDGES = (-(2**63), -(2**31) - 1, -1, 0, 1, 2**31, 2**63 - 1)
UINT32_EDGES = (0, 1, 2**31, 2**32 - 1)
UINT64_EDGES = (0, 1, 2**32, 2**63, 2**64 - 1)
# Past the range google.protobuf.Duration allows (±10,000 years), and just inside it.
DURATION_SECONDS_EDGES = (*INT64_EDGES, 315_576_000_000, 315_576_000_001, -315_576_000_001)
NANOS_EDGES = (*INT32_EDGES, 999_999_999, 1_000_000_000, -999_999_999)


def edge_ints(low: int, high: int, edges: tuple[int, ...]) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high))


int32s = edge_ints(-(2**31), 2**31 - 1, INT32_EDGES)
uint32s = edge_ints(0, 2**32 - 1, UINT32_EDGES)
uint64s = edge_ints(0, 2**64 - 1, UINT64_EDGES)
int64s = edge_ints(-(2**63), 2**63 - 1, INT64_EDGES)
# Timestamps around now, and any seconds/nanos pair at all (most out of the range allowed).
timestamps = st.builds(
    lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
    st.one_of(st.integers(1_700_000_000, 1_900_000_000), int64s),
    st.one_of(st.integers(0, 999_999_999), edge_ints(-(2**31), 2**31 - 1, NANOS_EDGES)),
)
# An open enum takes any int32: the known values, and everything else.
enum_values = st.one_of(st.integers(0, 8), int32s)
doubles = st.floats(allow_nan=True, allow_infinity=True)

NASTY_TEXTS = (
    "",
    " ",
    "\0",
    "a\0b",
    "\n",
    "\r\n",
    "\t",
    "\x7f",
    "..",
    "../../../../etc/passwd",
    "%s%n%x",
    "${PATH}",
    "$(id)",
    "\u202e\u0645",
    "\ufeff",
    "\U0010ffff",
    "NaN",
    "null",
    "-1",
)
# Lengths at and past the limits of spec fields (README: 63/64 an id, 128 a name, 1024 a
# description, 8 KiB an argument, 32 KiB an environment value), then past them all (70 000).
# Built from a length rather than listed: hypothesis prints its strategies' arguments.
LONG_LENGTHS = (63, 64, 129, 1025, 8193, 32769, 70_000)
long_texts = st.builds(
    lambda n, char: char * n, st.sampled_from(LONG_LENGTHS), st.sampled_from(["x", "é", "💥", "9"])
)
any_text = st.text(st.characters(codec="utf-8"), max_size=40)
texts = weighted((1, st.sampled_from(NASTY_TEXTS)), (1, long_texts), (3, any_text))
# In JSON payloads, which the daemon refuses whole past 64 KiB (those get payloads of their own).
json_texts = weighted(
    (1, st.sampled_from(NASTY_TEXTS)),
    (1, st.sampled_from([64, 256, 1025]).map(lambda n: "x" * n)),
    (3, any_text),
)
words = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ._-", min_size=1, max_size=12)

# -- agent ids ----------------------------------------------------------------------------------

# Reserved ids, malformed ones, and both sides of the length limit.
EDGE_IDS = (
    "",
    "manager",
    "status",
    "metrics",
    "node",
    "events",
    "a" * 63,
    "a" * 64,
    "-lead",
    "_lead",
    "UPPER",
    "a.b",
    "a*",
    ">",
    "a b",
    "é",
    "a\0b",
    "a\n",
    "../x",
)
new_ids = st.from_regex(r"fz-[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)


def agent_ids(named: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Ids a request may carry: the named agents' (two times in five, so that requests get
    past the id to the rest of their checks), new valid ones (all in the fz- namespace),
    reserved and malformed ones, and any text."""
    return weighted((2, st.sampled_from(named)), (1, new_ids), (1, st.sampled_from(EDGE_IDS)), (1, texts))


# -- durations ----------------------------------------------------------------------------------


def durations(max_valid_seconds: float) -> st.SearchStrategy[duration_pb2.Duration]:
    """A valid duration of at most max_valid_seconds, or a wild one (edges of both fields,
    mixed signs, nanos out of range). Longer valid values are left out on purpose: a start
    window or command timeout of an hour is valid and merely makes the run wait."""
    wild = st.builds(
        duration_pb2.Duration,
        seconds=st.sampled_from([s for s in DURATION_SECONDS_EDGES if not 1 < s <= 86_400]),
        nanos=st.sampled_from(NANOS_EDGES),
    )
    valid = st.integers(0, int(max_valid_seconds * 1e9)).map(
        lambda ns: duration_pb2.Duration(seconds=ns // 10**9, nanos=ns % 10**9)
    )
    return mix(valid, wild)


# -- JSON values and Struct params --------------------------------------------------------------

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    doubles,
    edge_ints(-(2**64), 2**64, (*INT64_EDGES, 2**53 + 1, 2**64, -(2**64))),
    json_texts,
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(json_texts, children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(json_texts, json_values, max_size=5)


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """{"a": {"a": ... leaf}} depth levels deep (a list every third level)."""
    value: Any = leaf
    for level in range(depth):
        value = [value] if level % 3 == 2 else {"a": value}
    return value if isinstance(value, dict) else {"a": value}


def as_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


# The server refuses params nested deeper than 16 levels; protobuf copies none past 33 (the
# deeper ones are written by hand: deep_params_request). 1.1 MB is more than a NATS message
# may be (1 MiB), and less than a gRPC request (4 MiB).
structs = st.one_of(
    json_objects.map(as_struct),
    st.sampled_from([15, 16, 17, 24, 33]).map(lambda depth: as_struct(nested(depth))),
    st.sampled_from([1_100_000]).map(lambda n: as_struct({"x": "y" * n})),
)


def deep_params_request(agent_id: str, depth: int) -> bytes:
    """A SendCommandRequest whose params nest depth Structs deep, written by hand: protobuf's
    Python library will not build one past its recursion limit (see test_bad_input)."""
    value = b"\x11" + struct.pack("<d", 1.0)  # Value.number_value
    params = b""
    for _ in range(depth):
        params = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields["a"] = value
        value = _field(5, params)  # Value.struct_value
    return _field(1, agent_id.encode()) + _field(2, b"echo") + _field(3, params)


# -- agent specs --------------------------------------------------------------------------------

SAFE_COMMANDS = (
    ["/bin/sleep", "1000"],
    ["sleep", "1000"],
    ["/bin/true"],
    ["/bin/echo", "hi"],
    ["bin/sleep", "9"],
)
BAD_PROGRAMS = ("", " ", "\0", "/no/such/program", "relative/prog", "/etc/passwd", "/tmp", "/dev/null", "/")


def _unknown_program(name: str) -> bool:
    try:
        return "/" not in name and shutil.which(name) is None
    except (OSError, ValueError):
        return True


programs = st.one_of(
    st.sampled_from(["/bin/true", "/bin/false", "/bin/echo", "/bin/sleep", "echo", "sleep"]),
    st.sampled_from(BAD_PROGRAMS),
    texts.map(lambda t: "/no/such/dir/" + t),
    texts.filter(_unknown_program),  # never a program this host has
)
commands = mix(
    st.sampled_from(SAFE_COMMANDS).map(list),
    st.one_of(
        st.builds(lambda program, args: [program, *args], programs, st.lists(texts, max_size=4)),
        st.sampled_from([1025, 5000]).map(lambda n: ["/bin/true"] * n),  # more arguments than allowed
    ),
)
# Never PATH with a drawn value: a bare program name is looked up on the spec's PATH, and only
# the host's PATH is known to hold no program a drawn name could reach (see _unknown_program).
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda n: n != "PATH")
environments = mix(
    st.dictionaries(env_names, words, max_size=3),
    st.one_of(
        st.dictionaries(
            st.one_of(
                env_names, st.sampled_from(["AGENT_ID", "X" * 257, "BAD NAME", "1X", "="]), texts
            ).filter(lambda n: n != "PATH"),
            texts,
            max_size=4,
        ),
        st.just({"PATH": "/no/such/dir"}),
        # More variables than allowed; and, from values each allowed, a spec over 128 KiB in all.
        st.sampled_from([513, 5000]).map(lambda n: {f"V{i}": "x" for i in range(n)}),
        st.sampled_from([7]).map(lambda n: {f"V{i}": "x" * 20_000 for i in range(n)}),
    ),
)
directories = mix(
    st.sampled_from(["", "/", "/tmp"]),
    st.one_of(
        st.sampled_from(
            ["relative", "/no/such/dir", "/etc/passwd", "/dev/null", "/proc/1", "/" + "d" * 5000]
        ),
        texts,
    ),
)
resources = st.builds(
    pb.ResourceLimits,
    memory_max_bytes=mix(st.integers(0, 2**30), uint64s),
    cpu_quota_percent=mix(st.floats(0, 400), doubles),
    tasks_max=mix(st.integers(0, 1000), uint32s),
    open_files_max=mix(st.sampled_from([0, 64, 1024]), uint32s),
)


@st.composite
def specs(draw: st.DrawFn) -> pb.AgentSpec:
    """An AgentSpec field by field: each plausible, wild, or (for the optional ones) unset."""
    spec = pb.AgentSpec()

    def maybe() -> bool:
        return draw(st.integers(0, 3)) < 3  # set three times in four (hypothesis favours 0)

    spec.name = draw(mix(new_ids, texts))
    for name in ("type", "version", "description"):
        if maybe():
            setattr(spec, name, draw(mix(words, texts)))
    spec.command.extend(draw(commands))
    if maybe():
        spec.working_directory = draw(directories)
    if maybe():
        spec.environment.update(draw(environments))
    if maybe():
        spec.restart_policy = draw(mix(st.integers(0, 3), enum_values))  # type: ignore[assignment]
    if maybe():
        spec.runtime = draw(mix(st.integers(0, 1), enum_values))  # type: ignore[assignment]
    for name in ("stop_timeout", "heartbeat_interval"):
        if maybe():
            getattr(spec, name).CopyFrom(draw(durations(5)))
    if maybe():
        spec.resources.CopyFrom(draw(resources))
    if maybe():
        spec.labels.update(draw(labels))
    spec.autostart = draw(st.booleans())
    spec.restart_on_inactive = draw(st.booleans())
    # Always set: unset means a 1 s start window, which only slows the run.
    spec.start_seconds.CopyFrom(draw(durations(0.05)))
    return spec


label_keys = st.from_regex(r"([a-z0-9]{1,8}\.)?[a-z0-9/._-]{1,12}", fullmatch=True)
labels = st.dictionaries(mix(label_keys, texts), mix(words, texts), max_size=4)
# Selectors that can only match agents labelled fuzz (a mutable fuzz agent, never one the other
# checks rely on): a negated requirement (!k, k!=v, notin) would also match every unlabelled
# agent, so wild text with '!' or "notin" is left out.
selectors = mix(
    st.sampled_from(["fuzz=yes", "fuzz in (yes,no)", "fuzz", "fuzz=yes,fuzz"]),
    texts.filter(lambda text: "!" not in text and "notin" not in text),
)


def bulk(message: type[Message], ids: st.SearchStrategy[str], **extra: Any) -> st.SearchStrategy[Message]:
    """A bulk request selecting in one way, none, or several; `all` only with another way (it
    would stop the agents the other checks rely on), where it is refused."""
    named = st.lists(ids, max_size=4)
    return weighted(
        (2, _with(message, agent_ids=named, **extra)),
        (2, _with(message, label_selector=selectors, **extra)),
        (
            1,
            _with(
                message, agent_ids=named.filter(bool), label_selector=selectors, all=st.booleans(), **extra
            ),
        ),
        (1, _with(message, **extra)),
    )


# Every path an update_mask may name (the servicer's own list), mixed below with junk.
MASK_PATHS = tuple(sorted(SPEC_MASK_PATHS))
masks = st.builds(
    lambda paths: field_mask_pb2.FieldMask(paths=paths),
    st.lists(mix(st.sampled_from(MASK_PATHS), texts), max_size=4),
)


def page_tokens(named: tuple[str, ...]) -> st.SearchStrategy[str]:
    def token(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    return mix(
        st.one_of(st.just(""), st.sampled_from(named).map(lambda agent_id: token(f"after:{agent_id}"))),
        st.one_of(texts, texts.map(lambda t: token(f"after:{t}")), texts.map(token)),
    )


# -- hostile manifests --------------------------------------------------------------------------

# The keys of agent.yaml (README "How agents run"); resources.* and environment take mappings.
MANIFEST_KEYS = tuple(sorted(KNOWN_KEYS))


def alias_bomb_manifest(key: str, levels: int = 9) -> str:
    """A manifest whose `key` holds YAML aliases nesting `levels` lists of nine (9**9 strings
    once expanded; the file is 1 KiB): a "billion laughs". Reading it is cheap, as the aliases
    share their lists; checking, converting or quoting the value as text expands it."""
    bomb = "".join(
        f"    - &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(levels)
    )
    lines = {"name": "  laughs", "entrypoint": "  [/bin/true]"}
    if key in ("environment", "resources"):  # mappings: the bomb is a value inside
        lines[key] = ("  memory_max:\n" if key == "resources" else "  LAUGHS:\n") + bomb.rstrip("\n")
    else:
        lines[key] = bomb.replace("    - ", "  - ", levels).rstrip("\n")
    return "".join(f"{name}:\n{value}\n" for name, value in lines.items())


# -- requests of every RPC ----------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """What the requests may name: agents to change, agents to only read, files on the host."""

    mutable: tuple[str, ...]  # known agents any request may change
    readable: tuple[str, ...]  # agents only read-only requests name (a running probe)
    running: tuple[str, ...]  # the known agents that run (a command to them is sent)
    manifests: tuple[str, ...]  # manifest paths: valid, broken, hostile


def _with(message: Callable[..., Message], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    """message(**fields), each field drawn (and left unset when its draw is None)."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        values = {name: draw(strategy) for name, strategy in fields.items()}
        return message(**{k: v for k, v in values.items() if v is not None})

    return build()


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return weighted((1, st.none()), (3, strategy))


def generated_requests(t: Targets) -> dict[str, st.SearchStrategy[Message]]:
    """A strategy of requests for every method of AgentService, by method name."""
    mutating = agent_ids(t.mutable)
    reading = agent_ids(t.mutable + t.readable)
    # A new id half the time, else none (derived from the name), a taken one, or a bad one.
    creating = weighted((2, new_ids), (1, st.none()), (1, mutating))
    return {
        "ListAgents": _with(
            pb.ListAgentsRequest,
            state=mix(st.integers(0, 7), enum_values),
            type=mix(st.sampled_from(["", "generic", "fuzzed"]), texts),
            node=mix(st.just(""), texts),
            page_size=mix(st.integers(0, 3), int32s),
            page_token=page_tokens(t.mutable),
            label_selector=mix(st.sampled_from(["", "fuzz=yes", "!fuzz", "fuzz notin (a)"]), texts),
        ),
        "CreateAgent": weighted(
            (3, _with(pb.CreateAgentRequest, agent_id=creating, spec=specs(), start=st.booleans())),
            (
                1,
                _with(
                    pb.CreateAgentRequest,
                    agent_id=creating,
                    manifest_path=mix(st.sampled_from(t.manifests), directories),
                    start=st.booleans(),
                ),
            ),
            (1, _with(pb.CreateAgentRequest, agent_id=creating)),  # neither spec nor manifest
        ),
        "GetAgent": _with(pb.GetAgentRequest, agent_id=reading),
        "UpdateAgent": _with(
            pb.UpdateAgentRequest, agent_id=mutating, spec=_optional(specs()), update_mask=_optional(masks)
        ),
        "DeleteAgent": _with(pb.DeleteAgentRequest, agent_id=mutating),
        "StartAgent": _with(pb.StartAgentRequest, agent_id=mutating),
        "StopAgent": _with(pb.StopAgentRequest, agent_id=mutating, timeout=_optional(durations(2))),
        "RestartAgent": _with(pb.RestartAgentRequest, agent_id=mutating),
        "StartAgents": bulk(pb.StartAgentsRequest, mutating),
        "StopAgents": bulk(pb.StopAgentsRequest, mutating, timeout=_optional(durations(2))),
        "RestartAgents": bulk(pb.RestartAgentsRequest, mutating),
        "GetAgentStatus": _with(pb.GetAgentStatusRequest, agent_id=reading),
        "GetAgentMetrics": _with(pb.GetAgentMetricsRequest, agent_id=reading),
        "GetAgentLogs": _with(
            pb.GetAgentLogsRequest,
            agent_id=reading,
            tail_lines=_optional(mix(st.integers(0, 5), int32s)),
            follow=st.booleans(),
            since=_optional(timestamps),
        ),
        "WatchEvents": _with(
            pb.WatchEventsRequest,
            agent_ids=st.one_of(st.lists(reading, max_size=5), st.just([f"fz-{i}" for i in range(10_000)])),
        ),
        "DiscoverAgents": st.just(pb.DiscoverAgentsRequest()),
        "SendCommand": _with(
            pb.SendCommandRequest,
            agent_id=reading,
            command=mix(st.sampled_from(["echo", "ping", "status", "config", "fail"]), texts),
            params=_optional(structs),
            timeout=_optional(durations(1)),
        ),
    }


def seed_requests(t: Targets) -> dict[str, st.SearchStrategy[Message]]:
    """Valid requests of every method, naming the known agents: the raw material of mutations."""
    known = st.sampled_from(t.mutable)
    readable = st.sampled_from(t.mutable + t.readable)
    sleeper_spec = st.builds(
        lambda name, description: pb.AgentSpec(
            name=name,
            description=description,
            command=["/bin/sleep", "1000"],
            environment={"FUZZ": description},
            start_seconds=duration_pb2.Duration(),
            stop_timeout=duration_pb2.Duration(seconds=2),
        ),
        new_ids,
        words,
    )
    return {
        "ListAgents": _with(
            pb.ListAgentsRequest,
            state=st.integers(0, 7),
            type=st.sampled_from(["", "generic", "fuzzed"]),
            page_size=st.integers(0, 3),
            page_token=st.one_of(st.just(""), page_tokens(t.mutable)),
        ),
        "CreateAgent": st.one_of(
            _with(pb.CreateAgentRequest, spec=sleeper_spec, start=st.booleans()),
            _with(pb.CreateAgentRequest, manifest_path=st.sampled_from(t.manifests[:1])),
        ),
        "GetAgent": _with(pb.GetAgentRequest, agent_id=readable),
        "UpdateAgent": _with(
            pb.UpdateAgentRequest,
            agent_id=known,
            spec=st.builds(pb.AgentSpec, description=words, environment=st.dictionaries(env_names, words)),
            update_mask=st.sampled_from(["description", "environment"]).map(
                lambda path: field_mask_pb2.FieldMask(paths=[path])
            ),
        ),
        "DeleteAgent": _with(pb.DeleteAgentRequest, agent_id=known),
        "StartAgent": _with(pb.StartAgentRequest, agent_id=known),
        "StopAgent": _with(pb.StopAgentRequest, agent_id=known, timeout=_optional(durations(1))),
        "RestartAgent": _with(pb.RestartAgentRequest, agent_id=known),
        "StartAgents": _with(pb.StartAgentsRequest, agent_ids=st.lists(known, min_size=1, max_size=3)),
        "StopAgents": _with(
            pb.StopAgentsRequest, label_selector=st.just("fuzz=yes"), timeout=_optional(durations(1))
        ),
        "RestartAgents": _with(pb.RestartAgentsRequest, agent_ids=st.lists(known, min_size=1, max_size=3)),
        "GetAgentStatus": _with(pb.GetAgentStatusRequest, agent_id=readable),
        "GetAgentMetrics": _with(pb.GetAgentMetricsRequest, agent_id=readable),
        "GetAgentLogs": _with(
            pb.GetAgentLogsRequest, agent_id=readable, tail_lines=st.integers(0, 5), follow=st.booleans()
        ),
        "WatchEvents": _with(pb.WatchEventsRequest, agent_ids=st.lists(readable, max_size=3)),
        "DiscoverAgents": st.just(pb.DiscoverAgentsRequest()),
        "SendCommand": _with(
            pb.SendCommandRequest,
            agent_id=st.sampled_from(t.readable),
            command=st.sampled_from(["echo", "ping"]),
            params=st.dictionaries(words, words, max_size=3).map(as_struct),
            timeout=st.just(duration_pb2.Duration(seconds=1)),
        ),
    }


# -- mutations ----------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """data damaged by one to four edits: a bit flipped, a byte set, bytes inserted or cut, the
    end truncated, a slice repeated, or a field appended (unknown, or a known one again, with
    any wire type and a length that may lie)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(out)))
        edit = draw(st.sampled_from(["flip", "set", "insert", "cut", "truncate", "repeat", "field"]))
        if edit == "flip" and out:
            out[min(where, len(out) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif edit == "set" and out:
            out[min(where, len(out) - 1)] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12]))
        elif edit == "insert":
            out[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "cut":
            del out[where : where + draw(st.integers(1, 8))]
        elif edit == "truncate":
            del out[where:]
        elif edit == "repeat":
            out[where:where] = out[where : where + draw(st.integers(1, 16))]
        elif edit == "field":
            number = draw(st.one_of(st.integers(1, 16), st.sampled_from([2**29 - 1, 19000, 1000])))
            wire = draw(st.integers(0, 7))
            body = draw(st.binary(max_size=12))
            length = draw(st.one_of(st.just(len(body)), st.sampled_from([0, 2**31, 2**63])))
            out += _varint(number << 3 | wire) + _varint(length) + body
    return bytes(out)


def raw_requests(t: Targets) -> dict[str, st.SearchStrategy[bytes]]:
    """Request bytes of every method: valid requests mutated; for SendCommand also params
    nested deeper than protobuf parses."""
    out = {
        method: seeds.flatmap(lambda message: mutated(message.SerializeToString()))
        for method, seeds in seed_requests(t).items()
    }
    deep = st.builds(deep_params_request, st.sampled_from(t.readable), st.sampled_from([17, 33, 101, 1000]))
    out["SendCommand"] = st.one_of(out["SendCommand"], deep)
    return out


# -- NATS payloads (DESIGN §5) ------------------------------------------------------------------

# The far ones first: hypothesis draws the first elements of a list most.
OFFSETS = ("+14:00", "-12:00", "+23:59", "-23:59", "+99:99", "Z", "z", "+00:00", "-00:00")


@st.composite
def _edge_times(draw: st.DrawFn) -> str:
    """The RFC 3339 shape with each part at or past its edge: month 13, day 32, hour 24,
    second 60, a fraction of 40 digits."""
    year = draw(st.sampled_from([1, 2, 1970, 2026, 9999]))
    month, day = draw(st.sampled_from([1, 12, 0, 13])), draw(st.sampled_from([1, 28, 31, 0, 32]))
    hour, minute, second = draw(st.sampled_from([(0, 0, 0), (23, 59, 59), (24, 0, 0), (23, 59, 60)]))
    fraction = draw(st.sampled_from(["", ".5", ".123456789", "." + "9" * 40]))
    sep = draw(st.sampled_from(["T", "t", " "]))
    return f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{fraction}"


# The first and the last instant a datetime holds: an offset can move either out of its range.
EXTREMES = ("0001-01-01T00:00:00", "9999-12-31T23:59:59.999999")
rfc3339 = weighted(
    (1, st.sampled_from(["2026-12-07T08:00:00Z", "2026-12-07T08:00:00.123+01:00"])),
    (
        1,
        st.builds(
            lambda moment, offset: moment + offset, st.sampled_from(EXTREMES), st.sampled_from(OFFSETS)
        ),
    ),
    (1, st.builds(lambda moment, offset: moment + offset, _edge_times(), st.sampled_from(OFFSETS))),
)


def _dumps(value: Any) -> bytes:
    # allow_nan: NaN and Infinity go out as the bare tokens a sloppy sender writes.
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode()


def _deep_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def _objects(draw: st.DrawFn, fields: Mapping[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A JSON object with each of fields present nine times in ten (of its own kind three
    times in four, else any JSON value), and sometimes keys of the sender's own."""
    obj: dict[str, Any] = draw(st.dictionaries(json_texts, json_values, max_size=2))
    for name, strategy in fields.items():
        if draw(st.integers(0, 9)) < 9:  # (hypothesis favours 0: that is the common case)
            obj[name] = draw(mix(strategy, json_values))
    return obj


MANAGER_COMMANDS = ("status", "list", "get", "start", "stop", "restart", "discover", "delete", "command")
STATES = ("starting", "running", "stopping", "stopped", "error", "inactive", "backoff")


def manager_params() -> st.SearchStrategy[dict[str, Any]]:
    numbers = mix(
        st.sampled_from([0.5, 1, 2]),
        st.one_of(doubles, edge_ints(-(2**64), 2**64, (*INT64_EDGES, 301, 0))),
    )
    return _objects(
        {
            "state": st.sampled_from(STATES),
            "type": mix(words, json_texts),
            "node": mix(words, json_texts),
            "timeout": numbers,
            "command": mix(st.sampled_from(["echo", "ping", "status", "fail"]), json_texts),
            "params": json_objects,
        }
    )


def manager_requests(ids: tuple[str, ...], readable: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """Requests for {p}.manager.command/.query: generated objects, a custom command for the
    probe, and the same damaged, truncated, nested too deep or not JSON at all."""
    generated = _objects(
        {
            "command": mix(st.sampled_from(MANAGER_COMMANDS), json_texts),
            "agent_id": agent_ids(ids),
            "params": manager_params(),
            "timestamp": rfc3339,
        }
    ).map(_dumps)
    to_probe = st.builds(
        lambda agent_id, params: _dumps({"command": "command", "agent_id": agent_id, "params": params}),
        st.sampled_from(readable),
        manager_params(),
    )
    return _payloads(weighted((3, generated), (1, to_probe)))


def heartbeats(ids: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    fields = {
        "agent_id": agent_ids(ids),
        "status": mix(st.sampled_from(STATES), json_texts),
        "timestamp": rfc3339,
        "metadata": json_objects,
    }
    return _payloads(_objects(fields).map(_dumps))


def metrics_reports(ids: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    def report(agent_id: str, depth: int) -> bytes:
        return b'{"agent_id":' + _dumps(agent_id) + b',"metrics":' + _deep_json(depth) + b"}"

    # Nested past protobuf's limit (100) and Python's json (~1000): the intake may take what
    # GetAgentMetrics then has to turn into a Struct.
    deep = st.builds(report, st.sampled_from(ids), st.sampled_from([17, 99, 101, 500, 5000]))
    fields = {"agent_id": agent_ids(ids), "timestamp": rfc3339, "metrics": json_objects}
    return _payloads(st.one_of(_objects(fields).map(_dumps), deep))


def _payloads(generated: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """generated payloads (most of the time), the same mutated, or bytes that were never JSON."""
    return weighted(
        (5, generated),
        (2, generated.flatmap(mutated)),
        (1, st.binary(max_size=64)),
        (1, st.sampled_from([b"[", b'{"a":', b"9", b" "]).map(lambda unit: unit * 100_000)),
    )


# -- explicit examples --------------------------------------------------------------------------
# Edges tried on every run before anything is generated: hypothesis draws far from uniformly,
# so a few dozen examples may never reach one of them. Most of them broke the daemon when this
# test was written (an answer of INTERNAL, no reply, a stall of many seconds and gigabytes).

# Offsets that push the first or the last instant a datetime holds out of its range.
OUT_OF_RANGE_TIMES = ("0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-12:00")


def explicit_requests(t: Targets) -> dict[str, list[Message]]:
    """Requests every run sends, by method (see the comment above)."""
    return {
        # Every hostile manifest: alias bombs, a FIFO, devices, files the daemon may not read.
        "CreateAgent": [pb.CreateAgentRequest(manifest_path=path) for path in t.manifests],
        # Params a NATS message cannot carry, to agents that run (the command would be sent).
        "SendCommand": [
            pb.SendCommandRequest(agent_id=agent_id, command="echo", params=as_struct({"x": "y" * 1_100_000}))
            for agent_id in t.running
        ],
    }


def explicit_raw_requests(t: Targets) -> dict[str, list[bytes]]:
    return {"SendCommand": [deep_params_request(t.readable[0], depth) for depth in (101, 1000)]}


def explicit_manager_requests(ids: tuple[str, ...]) -> list[bytes]:
    return [
        _dumps({"command": command, "agent_id": ids[0], "timestamp": moment})
        for moment in OUT_OF_RANGE_TIMES
        for command in ("list", "status")
    ]


def explicit_heartbeats(ids: tuple[str, ...]) -> list[bytes]:
    return [
        _dumps({"agent_id": ids[0], "status": "running", "timestamp": moment})
        for moment in OUT_OF_RANGE_TIMES
    ]


def explicit_metrics_reports(ids: tuple[str, ...]) -> list[bytes]:
    deep = [
        b'{"agent_id":' + _dumps(ids[0]) + b',"metrics":' + _deep_json(depth) + b"}" for depth in (101, 5000)
    ]
    dated = [
        _dumps({"agent_id": ids[0], "metrics": {"n": 1}, "timestamp": moment})
        for moment in OUT_OF_RANGE_TIMES
    ]
    return deep + dated
