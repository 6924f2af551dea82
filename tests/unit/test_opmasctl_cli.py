"""opmasctl end to end against a real in-process gRPC server with canned answers.

The servicer records every request, so each test checks both what the CLI sent and what it printed.
"""

from __future__ import annotations

import _thread
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]
from grpc_status import rpc_status

from opmas.v1 import agents_pb2, agents_pb2_grpc
from opmasctl.cli import run

Handler = Callable[[Any, grpc.ServicerContext], Any]


class FakeAgentService(agents_pb2_grpc.AgentServiceServicer):
    """Answers each method with handlers[name](request, context), or a default of the right type."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, message.Message]] = []
        self.handlers: dict[str, Handler] = {}
        self.cancelled = threading.Event()

    def _answer(
        self, name: str, request: message.Message, context: grpc.ServicerContext, default: Any
    ) -> Any:
        self.requests.append((name, request))
        handler = self.handlers.get(name)
        return handler(request, context) if handler else default

    def sent(self, name: str) -> list[Any]:
        return [request for method, request in self.requests if method == name]

    def ListAgents(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("ListAgents", request, context, agents_pb2.ListAgentsResponse())

    def CreateAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("CreateAgent", request, context, agents_pb2.Agent(agent_id="new"))

    def GetAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("GetAgent", request, context, agents_pb2.Agent(agent_id=request.agent_id))

    def UpdateAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("UpdateAgent", request, context, agents_pb2.Agent(agent_id=request.agent_id))

    def DeleteAgent(self, request, context):  # type: ignore[no-untyped-def]
        default = agents_pb2.DeleteAgentResponse(agent_id=request.agent_id, deleted=True)
        return self._answer("DeleteAgent", request, context, default)

    def StartAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("StartAgent", request, context, agents_pb2.StartAgentResponse())

    def StopAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("StopAgent", request, context, agents_pb2.StopAgentResponse())

    def RestartAgent(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("RestartAgent", request, context, agents_pb2.RestartAgentResponse())

    def GetAgentStatus(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer(
            "GetAgentStatus", request, context, agents_pb2.AgentStatus(agent_id=request.agent_id)
        )

    def GetAgentMetrics(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("GetAgentMetrics", request, context, agents_pb2.AgentMetrics())

    def GetAgentLogs(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("GetAgentLogs", request, context, iter(()))

    def WatchEvents(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("WatchEvents", request, context, iter(()))

    def DiscoverAgents(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("DiscoverAgents", request, context, agents_pb2.DiscoverAgentsResponse())

    def SendCommand(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer("SendCommand", request, context, agents_pb2.SendCommandResponse())


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FakeAgentService]:
    fake = FakeAgentService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agents_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
    socket = tmp_path / "opmasd.sock"
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    fake.socket = str(socket)  # type: ignore[attr-defined]
    yield fake
    server.stop(None)


def cli(service: FakeAgentService, *argv: str) -> int:
    return run(["--server", service.socket, *argv])  # type: ignore[attr-defined]


def _agent(agent_id: str, state: int = agents_pb2.AGENT_STATE_RUNNING, pid: int = 0) -> agents_pb2.Agent:
    return agents_pb2.Agent(
        agent_id=agent_id,
        spec=agents_pb2.AgentSpec(name=agent_id, type="monitor"),
        status=agents_pb2.AgentStatus(agent_id=agent_id, state=state, pid=pid),  # type: ignore[arg-type]
    )


def test_list_follows_pages(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    pages = {
        "": agents_pb2.ListAgentsResponse(agents=[_agent("a1", pid=11)], next_page_token="p2"),
        "p2": agents_pb2.ListAgentsResponse(agents=[_agent("a2", agents_pb2.AGENT_STATE_STOPPED)]),
    }
    service.handlers["ListAgents"] = lambda request, context: pages[request.page_token]
    assert cli(service, "agents", "list", "--state", "running", "--type", "monitor") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["ID", "TYPE", "STATE"]
    assert out[1].split()[:5] == ["a1", "monitor", "running", "-", "11"]
    assert out[2].split()[:3] == ["a2", "monitor", "stopped"]
    sent = service.sent("ListAgents")
    assert [r.page_token for r in sent] == ["", "p2"]
    assert all(
        r.page_size == 500 and r.state == agents_pb2.AGENT_STATE_RUNNING and r.type == "monitor" for r in sent
    )


def test_list_json_after_subcommand(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    pages = {
        "": agents_pb2.ListAgentsResponse(agents=[_agent("a1")], next_page_token="p2", total_size=2),
        "p2": agents_pb2.ListAgentsResponse(agents=[_agent("a2")], total_size=2),
    }
    service.handlers["ListAgents"] = lambda request, context: pages[request.page_token]
    # Global flags work after the subcommand too.
    assert run(["agents", "list", "-o", "json", "--server", service.socket]) == 0  # type: ignore[attr-defined]
    data = json.loads(capsys.readouterr().out)
    # The API's ListAgentsResponse with every page in it.
    assert sorted(data) == ["agents", "nextPageToken", "totalSize"]
    assert [a["agentId"] for a in data["agents"]] == ["a1", "a2"]
    assert (data["nextPageToken"], data["totalSize"]) == ("", 2)
    assert data["agents"][0]["status"]["state"] == "AGENT_STATE_RUNNING"


def test_output_name(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    service.handlers["ListAgents"] = lambda r, c: agents_pb2.ListAgentsResponse(
        agents=[_agent("a1"), _agent("a2")]
    )
    service.handlers["StopAgent"] = lambda r, c: agents_pb2.StopAgentResponse(
        status=agents_pb2.AgentStatus(agent_id=r.agent_id), changed=True
    )
    for argv, out in (
        (["agents", "list"], "a1\na2\n"),
        (["agents", "status"], "a1\na2\n"),
        (["agents", "get", "a1"], "a1\n"),
        (["agents", "status", "a1"], "a1\n"),
        (["agents", "stop", "a2"], "a2\n"),
        (["agents", "delete", "a2"], "a2\n"),
        (["agents", "update", "a2", "--type", "t"], "a2\n"),
        (["agents", "register", "--name", "x", "--command", "p"], "new\n"),
    ):
        assert cli(service, "-o", "name", *argv) == 0, argv
        assert capsys.readouterr().out == out, argv
    assert cli(service, "-o", "name", "agents", "logs", "a1") == 2
    assert "-o name: logs prints no agents" in capsys.readouterr().err


def test_no_agents_is_said_on_stderr(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "agents", "list") == 0
    assert capsys.readouterr() == ("", "no agents\n")
    assert cli(service, "agents", "list", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == {"agents": [], "nextPageToken": "", "totalSize": 0}


def test_start_changed_and_not(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    status = agents_pb2.AgentStatus(agent_id="sysmon", state=agents_pb2.AGENT_STATE_RUNNING, pid=1234)
    service.handlers["StartAgent"] = lambda r, c: agents_pb2.StartAgentResponse(status=status, changed=True)
    assert cli(service, "agents", "start", "sysmon") == 0
    assert capsys.readouterr().out == "agent sysmon started (pid 1234)\n"

    service.handlers["StartAgent"] = lambda r, c: agents_pb2.StartAgentResponse(status=status, changed=False)
    assert cli(service, "agents", "start", "sysmon") == 0
    assert capsys.readouterr().out == "agent sysmon is already running (pid 1234)\n"

    service.handlers["StartAgent"] = lambda r, c: agents_pb2.StartAgentResponse(
        status=status, changed=False, message="agent sysmon is already running"
    )
    assert cli(service, "agents", "start", "sysmon") == 0
    assert capsys.readouterr().out == "agent sysmon is already running\n"
    assert [r.agent_id for r in service.sent("StartAgent")] == ["sysmon"] * 3


def test_stop_sends_grace(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[float | None] = []

    def stop(request: agents_pb2.StopAgentRequest, context: grpc.ServicerContext) -> Any:
        seen.append(context.time_remaining())
        return agents_pb2.StopAgentResponse(status=agents_pb2.AgentStatus(agent_id="sysmon"), changed=True)

    service.handlers["StopAgent"] = stop
    assert cli(service, "agents", "stop", "sysmon", "--grace", "5") == 0
    assert capsys.readouterr().out == "agent sysmon stopped\n"
    (request,) = service.sent("StopAgent")
    assert request.timeout == duration_pb2.Duration(seconds=5)
    # --timeout after stop is the call's deadline, as everywhere; it is stretched by the grace.
    assert cli(service, "agents", "stop", "sysmon", "--grace", "5", "--timeout", "2") == 0
    assert service.sent("StopAgent")[1].timeout == duration_pb2.Duration(seconds=5)
    assert seen[1] is not None and 5 < seen[1] < 7.5


def test_register_from_flags(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    service.handlers["CreateAgent"] = lambda r, c: agents_pb2.Agent(
        agent_id="sysmon", status=agents_pb2.AgentStatus(pid=99)
    )
    code = cli(
        service,
        "agents", "register",
        "--name", "sysmon", "--type", "monitor",
        "--env", "A=1", "--env", "B=two=2",
        "--restart-policy", "always", "--stop-timeout", "-3",
        "--memory-max", "1G", "--autostart", "--start",
        "--", "python3", "-m", "sysmon", "--verbose",
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == "agent sysmon registered and started (pid 99)\n"
    (request,) = service.sent("CreateAgent")
    assert request.start is True
    assert request.manifest_path == ""
    spec = request.spec
    assert (spec.name, spec.type) == ("sysmon", "monitor")
    assert list(spec.command) == ["python3", "-m", "sysmon", "--verbose"]
    assert dict(spec.environment) == {"A": "1", "B": "two=2"}
    assert spec.restart_policy == agents_pb2.RESTART_POLICY_ALWAYS
    # Negative durations go to the server as given: it validates and names the field.
    assert spec.stop_timeout.seconds == -3
    assert spec.resources.memory_max_bytes == 1024**3
    assert spec.autostart is True


def test_register_command_flag_shlex(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "agents", "register", "--name", "x", "--command", "prog 'two words' -v") == 0
    assert capsys.readouterr().out == "agent new registered\n"
    (request,) = service.sent("CreateAgent")
    assert list(request.spec.command) == ["prog", "two words", "-v"]


def test_register_from_manifest_sends_absolute_path(
    service: FakeAgentService,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    service.handlers["CreateAgent"] = lambda r, c: agents_pb2.Agent(agent_id="sysmon")
    assert cli(service, "agents", "register", "--manifest", "agents/sysmon") == 0
    assert capsys.readouterr().out == "agent sysmon registered\n"
    (request,) = service.sent("CreateAgent")
    assert request.manifest_path == str(tmp_path / "agents" / "sysmon")
    assert not request.HasField("spec")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["agents", "register", "--name", "x", "--env", "BROKEN", "--command", "p"],
            "invalid --env 'BROKEN'",
        ),
        (["agents", "register", "--name", "x"], "--manifest PATH, or --name NAME and a command"),
        (["agents", "register", "--manifest", "m", "--name", "x"], "cannot be combined"),
        (["agents", "update", "x"], "nothing to update"),
        (["agents", "register", "--name", "x", "--memory-max", "lots", "--command", "p"], "invalid size"),
        (["agents", "list", "--", "extra"], "unexpected arguments after --"),
        (["agents", "frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    service: FakeAgentService, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli(service, *argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert service.requests == []


def test_update_sends_mask(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(service, "agents", "update", "a1", "--stop-timeout", "15", "--env", "K=V", "--cpu-quota", "50")
        == 0
    )
    assert capsys.readouterr().out.startswith("agent a1 updated")
    (request,) = service.sent("UpdateAgent")
    assert request.agent_id == "a1"
    assert list(request.update_mask.paths) == ["environment", "stop_timeout", "resources.cpu_quota_percent"]
    assert request.spec.stop_timeout.seconds == 15


def test_delete(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(service, "agents", "delete", "a1") == 0
    assert capsys.readouterr().out == "agent a1 deleted\n"
    service.handlers["DeleteAgent"] = lambda r, c: agents_pb2.DeleteAgentResponse(
        agent_id="a1", deleted=False, message="agent a1 was already deleted"
    )
    assert cli(service, "agents", "delete", "a1") == 0
    assert capsys.readouterr().out == "agent a1 was already deleted\n"


def test_logs_prints_lines(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    def logs(
        request: agents_pb2.GetAgentLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[agents_pb2.LogLine]:
        yield agents_pb2.LogLine(agent_id="a1", line="first")
        yield agents_pb2.LogLine(agent_id="a1", line="second\n", stream=agents_pb2.LOG_STREAM_STDOUT)
        oops = agents_pb2.LogLine(agent_id="a1", line="oops", stream=agents_pb2.LOG_STREAM_STDERR)
        oops.time.FromJsonString("2026-12-02T00:55:01.123Z")
        yield oops

    service.handlers["GetAgentLogs"] = logs
    assert cli(service, "agents", "logs", "a1", "--tail", "5") == 0
    assert capsys.readouterr().out == "first\nsecond\n[err] oops\n"
    (request,) = service.sent("GetAgentLogs")
    assert (request.tail_lines, request.follow) == (5, False)

    assert cli(service, "agents", "logs", "a1", "--timestamps") == 0
    stamped = capsys.readouterr().out.splitlines()
    assert stamped == ["- first", "- second", "2026-12-02T00:55:01.123Z [err] oops"]

    assert cli(service, "-o", "json", "agents", "logs", "a1") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["line"] for line in lines] == ["first", "second\n", "oops"]
    assert lines[2]["stream"] == "LOG_STREAM_STDERR" and lines[2]["time"] == "2026-12-02T00:55:01.123Z"


def test_logs_follow_ctrl_c_cancels_and_exits_130(
    service: FakeAgentService, capsys: pytest.CaptureFixture[str]
) -> None:
    def logs(
        request: agents_pb2.GetAgentLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[agents_pb2.LogLine]:
        context.add_callback(service.cancelled.set)
        yield agents_pb2.LogLine(agent_id="a1", line="one")
        yield agents_pb2.LogLine(agent_id="a1", line="two")
        # The client has printed both lines and waits for more: play the user's Ctrl-C.
        time.sleep(0.3)
        _thread.interrupt_main()
        while context.is_active():
            time.sleep(0.05)

    service.handlers["GetAgentLogs"] = logs
    assert cli(service, "agents", "logs", "a1", "-f") == 130  # the usual 128 + SIGINT
    captured = capsys.readouterr()
    assert captured.out == "one\ntwo\n"
    assert captured.err == ""
    assert service.cancelled.wait(5), "the server never saw the stream end"
    (request,) = service.sent("GetAgentLogs")
    assert request.follow is True


def test_watch_prints_events(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    def watch(
        request: agents_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[agents_pb2.AgentEvent]:
        event = agents_pb2.AgentEvent(
            agent_id="a1",
            previous_state=agents_pb2.AGENT_STATE_STARTING,
            state=agents_pb2.AGENT_STATE_RUNNING,
            reason="pid 7",
        )
        event.time.FromSeconds(1_700_000_000)
        yield event

    service.handlers["WatchEvents"] = watch
    assert cli(service, "agents", "watch", "a1", "a2") == 0
    assert capsys.readouterr().out == "2023-11-14T22:13:20Z  a1  starting → running  pid 7\n"
    (request,) = service.sent("WatchEvents")
    assert list(request.agent_ids) == ["a1", "a2"]


def test_command_params_and_result(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    def answer(
        request: agents_pb2.SendCommandRequest, context: grpc.ServicerContext
    ) -> agents_pb2.SendCommandResponse:
        response = agents_pb2.SendCommandResponse(agent_id="a1", command=request.command, status="success")
        response.result.struct_value.update({"ok": True})
        return response

    service.handlers["SendCommand"] = answer
    assert cli(service, "agents", "command", "a1", "scan", "--param", "depth=3", "--param", "host=r1") == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True}
    (request,) = service.sent("SendCommand")
    assert request.command == "scan"
    assert dict(request.params) == {"depth": 3, "host": "r1"}
    assert not request.HasField("timeout")
    # --reply-timeout is the daemon's wait for the agent; --timeout stays the call's deadline.
    assert cli(service, "agents", "command", "a1", "scan", "--reply-timeout", "7", "--timeout", "3") == 0
    assert service.sent("SendCommand")[1].timeout == duration_pb2.Duration(seconds=7)
    capsys.readouterr()

    service.handlers["SendCommand"] = lambda r, c: agents_pb2.SendCommandResponse(
        status="error", error="no such scan"
    )
    assert cli(service, "agents", "command", "a1", "scan") == 1
    assert "no such scan" in capsys.readouterr().err


def test_discover(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    service.handlers["DiscoverAgents"] = lambda r, c: agents_pb2.DiscoverAgentsResponse(
        agents=[agents_pb2.DiscoveredAgent(agent_id="a", name="A", manifest_path="/m/a", new=True)],
        errors=[agents_pb2.ManifestError(manifest_path="/m/b", message="bad yaml")],
    )
    assert cli(service, "agents", "discover") == 0
    out = capsys.readouterr().out
    assert "a   A     yes  /m/a" in out
    assert "/m/b      bad yaml" in out
    assert cli(service, "-o", "yaml", "agents", "discover") == 0
    assert "errors:" in capsys.readouterr().out


def test_error_with_bad_request_details(
    service: FakeAgentService, capsys: pytest.CaptureFixture[str]
) -> None:
    def reject(request: agents_pb2.CreateAgentRequest, context: grpc.ServicerContext) -> agents_pb2.Agent:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="spec.stop_timeout", description="must not be negative"
                    ),
                    error_details_pb2.BadRequest.FieldViolation(
                        field="spec.command", description="is required"
                    ),
                ]
            )
        )
        status = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message="invalid agent spec", details=[detail]
        )
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort_with_status returns only by raising")

    service.handlers["CreateAgent"] = reject
    assert cli(service, "agents", "register", "--name", "x", "--stop-timeout", "-1", "--command", "p") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: invalid_argument: invalid agent spec\n"
        "  spec.stop_timeout: must not be negative\n"
        "  spec.command: is required\n"
    )


def test_plain_error(service: FakeAgentService, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.NOT_FOUND, "agent nope not found")

    service.handlers["GetAgent"] = missing
    assert cli(service, "agents", "get", "nope") == 3  # NOT_FOUND
    assert capsys.readouterr().err == "error: not_found: agent nope not found\n"


def test_server_unavailable_is_not_a_connect_failure(
    service: FakeAgentService, capsys: pytest.CaptureFixture[str]
) -> None:
    def down(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAVAILABLE, "failed to connect to NATS")

    service.handlers["SendCommand"] = down
    assert cli(service, "agents", "command", "a1", "ping") == 4  # UNAVAILABLE: try again later
    assert capsys.readouterr().err == "error: unavailable: failed to connect to NATS\n"


def test_unreachable_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket = tmp_path / "absent.sock"
    assert run(["--server", str(socket), "--timeout", "5", "agents", "list"]) == 4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: cannot reach opmasd at {socket}: no such socket",
        "  start it: `make run` in a checkout, or `systemctl start opmasd`; "
        "or point --server (or $OPMAS_SERVER) at a running one",
    ]


def test_unreachable_env_tcp(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    monkeypatch.setenv("OPMAS_SERVER", "127.0.0.1:1")
    assert run(["agents", "status"]) == 4
    assert capsys.readouterr().err.startswith(
        "error: cannot reach opmasd at 127.0.0.1:1: connection refused\n"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("opmasctl ")


def test_help_lists_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    epilog = capsys.readouterr().out.split("exit status:", 1)[1]
    codes = [line.split()[0] for line in epilog.splitlines() if line[:5].strip().isdigit()]
    assert codes == ["0", "1", "2", "3", "4", "5", "130"]
