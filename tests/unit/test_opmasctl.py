"""opmasctl's pure parts: the default socket, flag parsing, spec/update_mask building, rendering.

Finding the daemon (--server, the configuration, the order of places): test_opmasctl_server.py."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from google.protobuf import duration_pb2, timestamp_pb2

from opmas.local import default_socket_path
from opmas.v1 import agents_pb2
from opmasctl import output, tables, views
from opmasctl.cli import build_parser
from opmasctl.parsing import parse_duration, parse_env, parse_params, parse_seconds, parse_size
from opmasctl.spec import SpecError, build_spec, environment_patch

# --- the default socket ------------------------------------------------------------------------


def test_default_socket_prefers_runtime_directory() -> None:
    env = {"RUNTIME_DIRECTORY": "/run/opmas", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(env, euid=1000) == Path("/run/opmas/opmasd.sock")


def test_default_socket_root_uses_run() -> None:
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/0"}, euid=0) == Path("/run/opmas/opmasd.sock")


def test_default_socket_user_uses_xdg_then_tmp() -> None:
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == (
        Path("/run/user/1000/opmas/opmasd.sock")
    )
    assert default_socket_path({}, 1000) == Path("/tmp/opmas-1000/opmasd.sock")


# --- flag values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("1.5", 1.5), ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("-5", -5.0)],
)
def test_parse_seconds(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


def test_parse_duration_negative_passes_through() -> None:
    duration = parse_duration("-1.5")
    assert duration.ToNanoseconds() == -1_500_000_000
    assert (duration.seconds, duration.nanos) == (-1, -500_000_000)
    assert parse_duration("90") == duration_pb2.Duration(seconds=90)


@pytest.mark.parametrize("text", ["", "abc", "10x", "1h30"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("512K", 512 * 1024),
        ("512M", 512 * 1024**2),
        ("1G", 1024**3),
        ("10MiB", 10 * 1024**2),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "1X", "M", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_parse_env() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}


@pytest.mark.parametrize("pair", ["NOEQUALS", "=value"])
def test_parse_env_rejects(pair: str) -> None:
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_env([pair])


def test_parse_params_json_else_string() -> None:
    params = parse_params(["n=42", "flag=true", "host=r1", "list=[1,2]", 'obj={"a":1}', 'q="7"'])
    assert dict(params) == {"n": 42, "flag": True, "host": "r1", "list": [1, 2], "obj": {"a": 1}, "q": "7"}


# --- spec flags and update_mask -------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_update_mask_lists_exactly_the_given_fields() -> None:
    args = _parse(
        "agents",
        "update",
        "a1",
        "--stop-timeout",
        "20",
        "--env",
        "A=1",
        "--memory-max",
        "512M",
        "--no-autostart",
    )
    spec, paths = build_spec(args, [])
    assert paths == ["environment", "stop_timeout", "resources.memory_max_bytes", "autostart"]
    assert spec.stop_timeout.seconds == 20
    assert dict(spec.environment) == {"A": "1"}
    assert spec.resources.memory_max_bytes == 512 * 1024**2
    assert spec.autostart is False


def test_update_mask_command_from_flag_or_dashes() -> None:
    spec, paths = build_spec(_parse("agents", "update", "a1", "--command", "prog 'a b' -v"), [])
    assert (list(spec.command), paths) == (["prog", "a b", "-v"], ["command"])
    spec, paths = build_spec(_parse("agents", "update", "a1"), ["prog", "--flag"])
    assert (list(spec.command), paths) == (["prog", "--flag"], ["command"])


def test_update_no_flags_gives_empty_mask() -> None:
    assert build_spec(_parse("agents", "update", "a1"), []) == (agents_pb2.AgentSpec(), [])


def test_update_clear_env() -> None:
    spec, paths = build_spec(_parse("agents", "update", "a1", "--clear-env"), [])
    assert paths == ["environment"] and not spec.environment


def test_update_edits_the_environment_unless_told_to_replace_it() -> None:
    args = _parse("agents", "update", "a1", "--env", "A=1", "--unset-env", "B", "--unset-env", "C")
    spec, paths = build_spec(args, [])
    assert paths == ["environment"] and environment_patch(args) == ({"A": "1"}, ["B", "C"])
    args = _parse("agents", "update", "a1", "--unset-env", "B")
    assert build_spec(args, [])[1] == ["environment"] and environment_patch(args) == ({}, ["B"])
    args = _parse("agents", "update", "a1", "--replace-env", "--env", "A=1")
    spec, paths = build_spec(args, [])
    assert dict(spec.environment) == {"A": "1"} and environment_patch(args) is None
    args = _parse("agents", "update", "a1", "--replace-env")
    assert build_spec(args, [])[1] == ["environment"] and environment_patch(args) is None
    assert environment_patch(_parse("agents", "update", "a1", "--description", "x")) is None
    with pytest.raises(SpecError, match="nothing to remove"):
        build_spec(_parse("agents", "update", "a1", "--replace-env", "--unset-env", "B"), [])


def test_spec_rejects_command_twice_and_bad_env() -> None:
    with pytest.raises(SpecError, match="not both"):
        build_spec(_parse("agents", "update", "a1", "--command", "x"), ["y"])
    with pytest.raises(SpecError, match="KEY=VALUE"):
        build_spec(_parse("agents", "update", "a1", "--env", "oops"), [])


def test_spec_enums_and_resources() -> None:
    args = _parse(
        "agents",
        "update",
        "a1",
        "--restart-policy",
        "on-failure",
        "--runtime",
        "systemd",
        "--cpu-quota",
        "150%",
    )
    spec, paths = build_spec(args, [])
    assert spec.restart_policy == agents_pb2.RESTART_POLICY_ON_FAILURE
    assert spec.runtime == agents_pb2.RUNTIME_KIND_SYSTEMD
    assert spec.resources.cpu_quota_percent == 150.0
    assert paths == ["restart_policy", "resources.cpu_quota_percent", "runtime"]


# --- rendering ------------------------------------------------------------------------------------

NOW = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def sample_agent() -> agents_pb2.Agent:
    return agents_pb2.Agent(
        agent_id="sysmon",
        spec=agents_pb2.AgentSpec(
            name="sysmon",
            type="monitor",
            version="1.2.0",
            command=["python", "-m", "sysmon", "--level", "a b"],
            environment={"B": "2", "A": "1"},
            restart_policy=agents_pb2.RESTART_POLICY_ON_FAILURE,
            stop_timeout=duration_pb2.Duration(seconds=10),
            resources=agents_pb2.ResourceLimits(memory_max_bytes=512 * 1024**2),
            runtime=agents_pb2.RUNTIME_KIND_PROCESS,
            autostart=True,
        ),
        status=agents_pb2.AgentStatus(
            agent_id="sysmon",
            state=agents_pb2.AGENT_STATE_RUNNING,
            desired_state=agents_pb2.DESIRED_STATE_RUNNING,
            pid=1234,
            uptime=duration_pb2.Duration(seconds=3723),
            restart_count=2,
            last_exit=agents_pb2.ExitInfo(signal=9, reason="killed", time=_ts(NOW)),
        ),
        source=agents_pb2.AGENT_SOURCE_DISCOVERED,
        manifest_path="/usr/lib/opmas/agents/sysmon/agent.yaml",
    )


def test_human_duration() -> None:
    assert output.human_duration(45) == "45s"
    assert output.human_duration(3723) == "1h2m3s"
    assert output.human_duration(125) == "2m5s"
    assert output.human_duration(90061) == "1d1h1m1s"
    assert output.human_duration(0.5) == "0.5s"


def _stopped() -> agents_pb2.Agent:
    return agents_pb2.Agent(
        agent_id="x",
        status=agents_pb2.AgentStatus(
            state=agents_pb2.AGENT_STATE_STOPPED, last_exit=agents_pb2.ExitInfo(exit_code=3)
        ),
    )


def test_agent_table() -> None:
    lines = views.agents_table([sample_agent(), _stopped()]).splitlines()
    # No NAME: it is the id unless set apart, so it mostly repeated ID (-o wide shows it).
    assert lines[0].split() == ["ID", "TYPE", "STATE", "DESIRED", "PID", "UPTIME", "RESTARTS", "LAST", "EXIT"]
    assert lines[1].split() == ["sysmon", "monitor", "running", "running", "1234", "1h2m3s", "2", "SIGKILL"]
    assert lines[2].split() == ["x", "-", "stopped", "-", "-", "-", "0", "exit", "3"]
    # Columns line up: every row's STATE starts where the header's does.
    column = lines[0].index("STATE")
    assert all(line[column:].startswith(("STATE", "running", "stopped")) for line in lines)
    assert views.agents_table([]) == ""


def test_agent_table_wide_adds_name_node_runtime_heartbeat_command() -> None:
    agent = sample_agent()
    agent.node = "node-a"
    agent.status.last_heartbeat_time.FromDatetime(datetime.now(UTC))
    header, row = views.agents_table([agent], tables.TableStyle(wide=True)).splitlines()
    assert header.split()[0:2] == ["ID", "NAME"]
    for name in ("NODE", "RUNTIME", "LAST HEARTBEAT", "COMMAND"):
        assert name in header
    assert row.split()[:2] == ["sysmon", "sysmon"]
    assert row[header.index("NODE") :].startswith("node-a ")
    assert row[header.index("RUNTIME") :].startswith("process ")
    assert row[header.index("LAST HEARTBEAT") :].split()[0] in ("0s", "1s")
    assert row.endswith("python -m sysmon --level 'a b'")


def test_no_headers() -> None:
    lines = views.agents_table([sample_agent(), _stopped()], tables.TableStyle(headers=False)).splitlines()
    assert [line.split()[0] for line in lines] == ["sysmon", "x"]


def test_table_fits_the_terminal_and_never_cuts_the_id() -> None:
    agent = sample_agent()
    agent.agent_id = "an-agent-with-a-rather-long-identifier"
    agent.spec.command[:] = ["python", "-m", "a.very.long.module.name", "--with", "many", "arguments"] * 3
    style = tables.TableStyle(wide=True, width=150)
    header, row = views.agents_table([agent], style).splitlines()
    assert len(header) <= 150 and len(row) <= 150
    assert row.startswith("an-agent-with-a-rather-long-identifier ")
    assert row.endswith("…")
    # Only the free-text columns are cut: the status columns stay readable.
    assert " running " in row and " 1h2m3s " in row and " SIGKILL" in row
    # Piped (no width), nothing is cut.
    piped = views.agents_table([agent], tables.TableStyle(wide=True)).splitlines()[1]
    assert "…" not in piped and piped.endswith("arguments")
    # Narrower than the id column: the id stays whole, the rest gives way.
    assert views.agents_table([agent], tables.TableStyle(width=20)).splitlines()[1].startswith(agent.agent_id)


def test_fit_shrinks_the_widest_elastic_columns_first() -> None:
    assert tables.fit([10, 30, 8], 40, elastic=[1, 2]) == [10, 18, 8]
    assert tables.fit([10, 30, 30], 50, elastic=[1, 2]) == [10, 18, 18]
    assert tables.fit([10, 30, 30], 50, elastic=[2]) == [10, 30, 6]  # the others stay whole
    assert tables.fit([50, 30], 40, elastic=[1]) == [50, tables.MIN_WIDTH]  # overflows, id whole
    assert tables.cut("abcdef", 4) == "abc…" and tables.cut("abc", 4) == "abc"


def test_state_in_colour_only_when_asked() -> None:
    coloured = views.agents_table([sample_agent(), _stopped()], tables.TableStyle(colour=True))
    header, running, stopped = coloured.splitlines()
    assert "\x1b[32mrunning\x1b[0m" in running  # the STATE cell; DESIRED is left plain
    assert running.count("\x1b[") == 2
    assert "\x1b[" not in header and "\x1b[" not in stopped
    # Escape codes take no room: the columns after STATE still line up.
    plain = views.agents_table([sample_agent(), _stopped()]).splitlines()
    assert running.replace("\x1b[32m", "").replace("\x1b[0m", "") == plain[1]
    assert "\x1b[" not in views.agents_table([sample_agent()])


@pytest.mark.parametrize(
    ("tty", "env", "colour"),
    [
        (True, {"TERM": "xterm"}, True),
        (True, {"TERM": "xterm", "NO_COLOR": "1"}, False),
        (True, {"TERM": "xterm", "NO_COLOR": ""}, True),  # no-color.org: set and not empty
        (True, {"TERM": "dumb"}, False),
        (False, {"TERM": "xterm"}, False),
    ],
)
def test_style_detect(tty: bool, env: dict[str, str], colour: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stream:
        def isatty(self) -> bool:
            return tty

    monkeypatch.setenv("COLUMNS", "77")
    style = tables.TableStyle.detect(stream=Stream(), env=env)  # type: ignore[arg-type]
    assert style.colour is colour
    assert style.width == (77 if tty else None)


def test_agent_view_key_values() -> None:
    text = views.agent_view(sample_agent())
    assert "ID:" in text and "sysmon" in text
    assert "Command:" in text and "python -m sysmon --level 'a b'" in text
    assert "Restart policy:" in text and "on-failure" in text
    assert "Memory max:" in text and "512.0MiB" in text
    # Environment is one variable per line, sorted, continuation lines indented under the value.
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("Environment:"))
    assert lines[index].endswith("A=1")
    assert lines[index + 1].strip() == "B=2"
    assert lines[index + 1].index("B") == lines[index].index("A=1")


def test_json_and_yaml_rendering() -> None:
    data = output.message_to_dict(sample_agent())
    as_json = json.loads(output.dump(data, "json"))
    # The REST API's mapping: lowerCamelCase, enum names, Durations as strings.
    assert as_json["agentId"] == "sysmon"
    assert as_json["status"]["state"] == "AGENT_STATE_RUNNING"
    assert as_json["spec"]["stopTimeout"] == "10s"
    assert as_json["spec"]["resources"]["memoryMaxBytes"] == str(512 * 1024**2)  # uint64: a string
    # Fields without presence are printed even at their default value; unset messages as null.
    assert as_json["spec"]["restartOnInactive"] is False
    assert as_json["node"] == ""
    assert as_json["createTime"] is None and as_json["status"]["lastHeartbeatTime"] is None
    assert "agent_id" not in as_json
    assert yaml.safe_load(output.dump(data, "yaml")) == as_json
    line = output.dump_item(data, "json")
    assert line.count("\n") == 1 and json.loads(line) == as_json


def test_event_line() -> None:
    event = agents_pb2.AgentEvent(
        agent_id="sysmon",
        previous_state=agents_pb2.AGENT_STATE_RUNNING,
        state=agents_pb2.AGENT_STATE_ERROR,
        reason="exit code 1",
        time=_ts(NOW),
    )
    assert views.event_line(event) == "2025-05-01T12:00:00Z  sysmon  running → error  exit code 1\n"


def test_discover_view() -> None:
    response = agents_pb2.DiscoverAgentsResponse(
        agents=[
            agents_pb2.DiscoveredAgent(agent_id="a", name="A", manifest_path="/p/a/agent.yaml", new=True)
        ],
        errors=[agents_pb2.ManifestError(manifest_path="/p/b/agent.yaml", message="name: required")],
    )
    lines = views.discover_view(response).splitlines()
    assert lines[0].split() == ["ID", "NAME", "NEW", "MANIFEST"]
    assert lines[1].split() == ["a", "A", "yes", "/p/a/agent.yaml"]
    assert lines[2] == ""
    assert lines[3].split() == ["MANIFEST", "ERROR"]
    assert lines[4].split(None, 1) == ["/p/b/agent.yaml", "name: required"]


def test_metrics_view_shows_reported_numbers_plainly() -> None:
    metrics = agents_pb2.AgentMetrics(agent_id="sysmon", cpu_percent=3.5, rss_bytes=1536, restart_count=1)
    metrics.reported.update({"events": 10, "ratio": 0.25, "queue": {"depth": 2}})
    lines = views.metrics_view(metrics).splitlines()
    assert "3.5%" in lines[1] and "1.5KiB" in lines[2]
    reported = [line.removeprefix("Reported:").strip() for line in lines if "=" in line]
    assert reported == ["events=10", 'queue={"depth": 2}', "ratio=0.25"]
