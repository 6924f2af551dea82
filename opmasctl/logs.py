"""`opmasctl agents logs`: one agent's output, or several agents' (ids or `-l SELECTOR`) merged.

Several agents' lines are prefixed with `[ID] `, as `kubectl logs -l --prefix` and journalctl
name their units; without --follow they are merged in time order, with --follow printed as
they arrive (one stream per agent, read by a thread each). A line of stderr is marked `[err]`.

An agent's output is the agent's bytes: on a terminal its control characters are shown as
`\\xNN` (output.visible_controls) rather than obeyed (an agent could otherwise rewrite the
operator's screen or title, or make the terminal type); into a pipe or file, or with --raw,
the lines go as the agent wrote them. -o json / yaml escape them as their formats do.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2

from opmas.v1 import agents_pb2
from opmasctl.commands import Context, Stream, UsageError, follow, list_agents, stream_render
from opmasctl.exits import EXIT_INTERRUPTED, EXIT_OK
from opmasctl.output import visible_controls, write
from opmasctl.parsing import parse_seconds

Render = Callable[[agents_pb2.LogLine], str]


def parse_since(text: str, now: datetime | None = None) -> timestamp_pb2.Timestamp:
    """--since: a duration back from now (90s, 10m, 2h) or an RFC 3339 time."""
    seconds: float | None
    try:
        seconds = parse_seconds(text)
    except ValueError:
        seconds = None
        try:
            # fromisoformat checks the offset's range too (protobuf's own parser does not).
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(
                f"invalid --since {text!r}: give a duration (10m, 2h) or a time (2026-01-31T12:00:00Z)"
            ) from None
        if when.tzinfo is None:
            raise ValueError(f"invalid --since {text!r}: a time needs its offset (Z, +01:00)") from None
    else:
        if seconds < 0:
            raise ValueError(f"invalid --since {text!r}: must not be negative")
        when = now or datetime.now(UTC)
    stamp = timestamp_pb2.Timestamp()
    try:
        if seconds is not None:
            when -= timedelta(seconds=seconds)
        stamp.FromDatetime(when.astimezone(UTC).replace(tzinfo=None))
    except (ValueError, OverflowError):  # before year 1 once in UTC, or outside Timestamp's range
        raise ValueError(f"invalid --since {text!r}: the time is out of range") from None
    return stamp


def log_line(
    line: agents_pb2.LogLine, timestamps: bool = False, prefix: bool = False, raw: bool = True
) -> str:
    """The text as the agent wrote it (raw) or with its control characters shown (not raw);
    stderr marked `[err] `, then when and whose, if asked."""
    text = line.line.removesuffix("\n")
    text = (text if raw else visible_controls(text)) + "\n"
    if line.stream == agents_pb2.LOG_STREAM_STDERR:
        text = "[err] " + text
    if timestamps:
        when = line.time.ToJsonString() if line.HasField("time") else "-"
        text = f"{when} {text}"
    if prefix:
        text = f"[{line.agent_id}] {text}"
    return text


def _request(args: argparse.Namespace, agent_id: str) -> agents_pb2.GetAgentLogsRequest:
    request = agents_pb2.GetAgentLogsRequest(agent_id=agent_id, follow=args.follow)
    if args.tail is not None:
        request.tail_lines = args.tail
    if args.since is not None:
        try:
            request.since.CopyFrom(parse_since(args.since))
        except ValueError as err:
            raise UsageError(str(err)) from None
    return request


def agents_logs(ctx: Context, args: argparse.Namespace) -> int:
    if args.agent_ids and args.selector is not None:
        raise UsageError("give agent ids or -l SELECTOR, not both")
    if not args.agent_ids and args.selector is None:
        raise UsageError("give an agent id (or several), or -l SELECTOR")
    if args.selector is not None:
        agent_ids = [agent.agent_id for agent in list_agents(ctx, selector=args.selector)]
    else:
        agent_ids = list(dict.fromkeys(args.agent_ids))
    if not agent_ids:
        print(f"no agents match {args.selector!r}", file=sys.stderr)
        return EXIT_OK
    several = len(agent_ids) > 1 or args.selector is not None
    timestamps = bool(args.timestamps)
    raw = bool(args.raw) or not sys.stdout.isatty()
    render: Render = stream_render(ctx, lambda line: log_line(line, timestamps, several, raw))
    requests = [_request(args, agent_id) for agent_id in agent_ids]
    if not several:
        stream = ctx.stub.GetAgentLogs(requests[0], timeout=None if args.follow else ctx.timeout)
        return follow(stream, render)
    if args.follow:
        return _follow_many(ctx, requests, render)
    # Read every tail first (an unknown id fails the command before anything is printed), then
    # print them merged by time; a line whose time was not recorded keeps its place.
    lines: list[tuple[int, int, agents_pb2.LogLine]] = []
    for request in requests:
        when = 0  # a line without a time takes the one before it in its own log
        for index, line in enumerate(ctx.stub.GetAgentLogs(request, timeout=ctx.timeout)):
            when = line.time.ToNanoseconds() if line.HasField("time") else when
            lines.append((when, index, line))
    for _, _, line in sorted(lines, key=lambda item: (item[0], item[1])):
        write(render(line))
    return EXIT_OK


_END = object()


def _follow_many(ctx: Context, requests: list[agents_pb2.GetAgentLogsRequest], render: Render) -> int:
    """Every agent's stream read by a thread of its own into one queue, printed as it comes.
    The first stream that fails (the daemon going away) ends them all with its error; Ctrl-C
    cancels them all and exits 130."""
    lines: queue.Queue[object] = queue.Queue(maxsize=10_000)
    streams: list[Stream[agents_pb2.LogLine]] = [
        ctx.stub.GetAgentLogs(request, timeout=None) for request in requests
    ]

    def read(stream: Stream[agents_pb2.LogLine]) -> None:
        try:
            for line in stream:
                lines.put(line)
        except grpc.RpcError as err:
            lines.put(err)
        lines.put(_END)

    threads = [threading.Thread(target=read, args=(stream,), daemon=True) for stream in streams]
    for thread in threads:
        thread.start()
    ended = 0
    try:
        while ended < len(streams):
            item = lines.get()
            if item is _END:
                ended += 1
            elif isinstance(item, grpc.RpcError):
                if isinstance(item, grpc.Call) and item.code() == grpc.StatusCode.CANCELLED:
                    continue
                raise item
            else:
                assert isinstance(item, agents_pb2.LogLine)
                write(render(item))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        for stream in streams:
            stream.cancel()
    return EXIT_OK
