"""REST from the proto's google.api.http rules, against a real opmasd: what curl sees.

Every seed endpoint, the error shapes and codes of grpc-gateway, streaming as NDJSON (a client
that leaves, a daemon that stops), and the unix-socket listener.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Sandbox, free_port, python_agent, sleeper, wait_for
from .rest_client import Rest, rest_env, rest_of, rest_sandbox

pytestmark = pytest.mark.timeout(90)

TICKER = python_agent(
    """
    import itertools, sys, time
    for n in itertools.count():
        print(f"tick {n}", flush=True)
        time.sleep(0.05)
    """
)


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with rest_sandbox("rest") as b:
        yield b


@pytest.fixture
def rest(box: Sandbox) -> Iterator[Rest]:
    client = rest_of(box)
    yield client
    client.close()


def register(rest: Rest, agent_id: str, command: list[str], start: bool = False, **spec: object) -> dict:
    reply = rest.post(
        "/api/v1/agents",
        {"agentId": agent_id, "spec": {"name": agent_id, "command": command, **spec}, "start": start},
    )
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the seed endpoints -------------------------------------------------------------------------


def test_the_agent_lifecycle_over_rest(rest: Rest) -> None:
    agent = register(rest, "rest-life", sleeper(), type="e2e-rest", description="over REST")
    # grpc-gateway's marshalling: lowerCamelCase names, unpopulated fields present, int64 as text.
    assert agent["agentId"] == "rest-life"
    assert agent["spec"]["type"] == "e2e-rest"
    assert agent["status"]["state"] == "AGENT_STATE_STOPPED"
    assert agent["status"]["restartCount"] == 0
    assert "pid" in agent["status"]

    got = rest.get("/api/v1/agents/rest-life")
    assert got.status == 200 and got.json()["spec"]["description"] == "over REST"
    assert got.headers["content-type"].startswith("application/json")

    started = rest.post("/api/v1/agents/rest-life/start")
    assert started.status == 200, started.body
    assert started.json()["changed"] is True
    assert started.json()["status"]["state"] == "AGENT_STATE_RUNNING"
    pid = started.json()["status"]["pid"]

    status = rest.get("/api/v1/agents/rest-life/status").json()
    assert (status["state"], status["pid"]) == ("AGENT_STATE_RUNNING", pid)
    metrics = rest.get("/api/v1/agents/rest-life/metrics")
    assert metrics.status == 200 and metrics.json()["agentId"] == "rest-life"

    updated = rest.request(
        "PUT",
        "/api/v1/agents/rest-life",
        body={"spec": {"description": "changed"}, "updateMask": "description"},
    )
    assert updated.status == 200, updated.body
    assert updated.json()["spec"]["description"] == "changed"
    assert updated.json()["spec"]["type"] == "e2e-rest"  # only the masked field changed

    restarted = rest.post("/api/v1/agents/rest-life/restart")
    assert restarted.status == 200 and restarted.json()["status"]["pid"] != pid
    stopped = rest.post("/api/v1/agents/rest-life/stop", {"timeout": "2s"})
    assert stopped.status == 200, stopped.body
    assert stopped.json()["status"]["state"] == "AGENT_STATE_STOPPED"

    logs = rest.get("/api/v1/agents/rest-life/logs?tailLines=10")
    lines = [json.loads(line) for line in logs.body.splitlines()]
    assert logs.headers["content-type"].startswith("application/x-ndjson")
    assert all("result" in item for item in lines), lines[-1]  # a finished read ends without an error
    assert any("hello from rest-life" in item["result"]["line"] for item in lines), lines

    deleted = rest.request("DELETE", "/api/v1/agents/rest-life")
    assert deleted.status == 200 and deleted.json()["deleted"] is True
    assert rest.get("/api/v1/agents/rest-life").status == 404


def test_list_with_query_parameters(rest: Rest) -> None:
    for agent_id in ("rest-q-a", "rest-q-b", "rest-q-c"):
        register(rest, agent_id, sleeper(), type="e2e-rest-q")
    everything = rest.get("/api/v1/agents?type=e2e-rest-q").json()
    assert [a["agentId"] for a in everything["agents"]] == ["rest-q-a", "rest-q-b", "rest-q-c"]
    # Names as in the proto or as in JSON; enums by name or by number.
    page = rest.get("/api/v1/agents?type=e2e-rest-q&page_size=2").json()
    assert len(page["agents"]) == 2 and page["nextPageToken"]
    rest_page = rest.get(f"/api/v1/agents?type=e2e-rest-q&pageSize=2&pageToken={page['nextPageToken']}")
    assert [a["agentId"] for a in rest_page.json()["agents"]] == ["rest-q-c"]
    by_name = rest.get("/api/v1/agents?type=e2e-rest-q&state=AGENT_STATE_STOPPED").json()
    by_number = rest.get("/api/v1/agents?type=e2e-rest-q&state=4").json()
    assert len(by_name["agents"]) == len(by_number["agents"]) == 3
    running = rest.get("/api/v1/agents?type=e2e-rest-q&state=AGENT_STATE_RUNNING").json()
    assert running["agents"] == []


def test_discover_custom_verb(rest: Rest) -> None:
    reply = rest.post("/api/v1/agents:discover")
    assert reply.status == 200, reply.body
    assert set(reply.json()) == {"agents", "errors"}


# -- errors: grpc-gateway's shapes and codes -----------------------------------------------------


def assert_status(reply, http: int, code: int, *words: str) -> dict:  # type: ignore[no-untyped-def]
    assert reply.status == http, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code, body
    for word in words:
        assert word in body["message"], body
    return body  # type: ignore[no-any-return]


def test_unknown_agent_is_404_with_resource_info(rest: Rest) -> None:
    body = assert_status(rest.get("/api/v1/agents/no-such-agent"), 404, 5, "no-such-agent")
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ResourceInfo"
    assert body["details"][0]["resourceName"] == "no-such-agent"


def test_bad_field_is_400_with_the_field_named(rest: Rest) -> None:
    reply = rest.post(
        "/api/v1/agents", {"agentId": "Bad Id!", "spec": {"name": "x", "command": ["/bin/true"]}}
    )
    body = assert_status(reply, 400, 3, "agent_id")
    violations = body["details"][0]["fieldViolations"]
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert violations[0]["field"] == "agent_id"


def test_unknown_body_field_is_refused_naming_it(rest: Rest) -> None:
    reply = rest.post("/api/v1/agents", {"agentId": "x1", "spec": {"name": "x", "comand": ["/bin/true"]}})
    assert_status(reply, 400, 3, "comand")


def test_unknown_query_parameter_is_refused_naming_it(rest: Rest) -> None:
    assert_status(rest.get("/api/v1/agents?stat=AGENT_STATE_RUNNING"), 400, 3, "stat")
    assert_status(rest.get("/api/v1/agents?state=AGENT_STATE_SLEEPING"), 400, 3, "state")
    assert_status(rest.get("/api/v1/agents?pageSize=many"), 400, 3, "pageSize")


def test_unknown_path_is_404_and_wrong_method_405_with_allow(rest: Rest) -> None:
    assert_status(rest.get("/api/v1/nothing-here"), 404, 5, "/api/v1/nothing-here")
    reply = rest.request("PATCH", "/api/v1/agents/some-agent")
    body = assert_status(reply, 405, 12, "PATCH")
    assert reply.headers["allow"] == "DELETE, GET, PUT", reply.headers
    assert body["details"] == []
    assert rest.request("DELETE", "/api/v1/agents").headers["allow"] == "GET, POST"


def test_bad_json_names_the_position(rest: Rest) -> None:
    reply = rest.post("/api/v1/agents", raw=b'{"agentId": "x",\n  "spec": }')
    assert_status(reply, 400, 3, "line 2 column 11")
    assert_status(rest.post("/api/v1/agents", raw=b"[1, 2]"), 400, 3, "JSON object")
    assert_status(rest.post("/api/v1/agents", raw=b'{"agentId": NaN}'), 400, 3, "NaN")


def test_body_over_the_limit_is_413_and_wrong_content_type_415(rest: Rest) -> None:
    big = {"agentId": "big", "spec": {"name": "big", "command": ["/bin/true"], "description": "x" * 70_000}}
    assert_status(rest.post("/api/v1/agents", big), 413, 8, "65536")
    reply = rest.post("/api/v1/agents", raw=b"agentId=x", headers={"Content-Type": "text/plain"})
    assert_status(reply, 415, 3, "text/plain")
    # The daemon is fine afterwards, on the same kept-alive connection or a new one.
    assert rest.get("/api/v1/agents").status == 200


# -- streams ------------------------------------------------------------------------------------


def test_log_follow_streams_ndjson_and_a_client_that_leaves_frees_it(box: Sandbox, rest: Rest) -> None:
    register(rest, "rest-ticker", TICKER, start=True)
    daemon_pid = box.daemon.pid
    before = fd_count(daemon_pid)
    conn, response = rest.stream("/api/v1/agents/rest-ticker/logs?follow=true&tailLines=1")
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("application/x-ndjson")
    lines = [json.loads(response.readline())["result"]["line"] for _ in range(6)]
    assert sum(1 for line in lines if line.startswith("tick ")) >= 5, lines
    assert fd_count(daemon_pid) > before  # the stream holds descendants while it is open
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    # The stream's connection, its gRPC call and its log follower are released.
    wait_for(lambda: fd_count(daemon_pid) <= before, 10, what="the stream's descriptors released")
    rest.post("/api/v1/agents/rest-ticker/stop")


def test_a_stream_refused_at_once_gets_its_own_status(rest: Rest) -> None:
    assert_status(rest.get("/api/v1/agents/nobody-here/logs?follow=true"), 404, 5, "nobody-here")


def test_watch_events_streams_state_changes(rest: Rest) -> None:
    register(rest, "rest-watched", sleeper())
    conn, response = rest.stream("/api/v1/events?agentIds=rest-watched")
    assert response.status == 200
    assert rest.post("/api/v1/agents/rest-watched/start").status == 200
    states = [json.loads(response.readline())["result"]["state"] for _ in range(2)]
    assert states == ["AGENT_STATE_STARTING", "AGENT_STATE_RUNNING"], states
    conn.close()
    rest.post("/api/v1/agents/rest-watched/stop")


def test_shutdown_ends_open_streams_promptly(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    box = make_sandbox("rest-shutdown", env=rest_env(port, OPMAS_GRPC_GRACE_PERIOD="10"))
    box.start()
    rest = rest_of(box, port)
    register(rest, "rest-quiet", sleeper())
    conn, response = rest.stream("/api/v1/events")
    assert response.status == 200
    began = time.monotonic()
    os.kill(box.daemon.pid, signal.SIGTERM)
    last = response.readline()
    assert json.loads(last)["error"]["code"] == 14, last
    assert response.readline() == b""
    assert time.monotonic() - began < 5, "the stream held the shutdown"
    assert box.daemon.popen.wait(15) == 0
    conn.close()


# -- listeners ----------------------------------------------------------------------------------


def test_rest_on_a_unix_socket(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    box = make_sandbox("rest-unix")
    path = Path(box.runtime_dir) / "rest.sock"
    box.start(env={"OPMAS_REST_ENABLED": "true", "OPMAS_REST_ADDRESS": "", "OPMAS_REST_SOCKET": str(path)})
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    client = Rest(socket_path=str(path))
    assert client.get("/api/v1/agents").json()["agents"] == []
    assert client.get("/healthz").status == 200
    client.close()


def test_a_taken_rest_port_stops_the_start_with_a_clear_message(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        box = make_sandbox("rest-taken")
        with pytest.raises(AssertionError, match="exited with status 1"):
            box.start(env=rest_env(port))
        assert f"cannot listen for HTTP on 127.0.0.1:{port}" in box.daemons[-1].stderr_text()


# -- hostile or careless clients (found by attacking the gateway from outside) ------------------


def authorized(box: Sandbox, head: bytes) -> bytes:
    """A request head with the sandbox's admin token added after its first line."""
    first, _, rest = head.partition(b"\r\n")
    return b"%s\r\nAuthorization: Bearer %s\r\n%s" % (first, box.admin_token().encode(), rest)


def raw_request(port: int, head: bytes, parts: list[bytes], pause: float = 0.0) -> bytes:
    """Send a request's head, then its body in parts (pausing between them); the whole reply."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for part in parts:
            time.sleep(pause)
            sock.sendall(part)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
            if (b"\r\n\r\n" in b"".join(chunks) and b'"code"' in b"".join(chunks)) or b"}\n" in data:
                break
        return b"".join(chunks)


def test_a_body_in_many_pieces_is_read_whole_and_chunked_bodies_keep_the_limit(box: Sandbox) -> None:
    port = box.rest_port  # type: ignore[attr-defined]
    body = json.dumps(
        {"agentId": "rest-split", "spec": {"name": "rest-split", "command": sleeper()}}
    ).encode()
    head = (
        b"POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    reply = raw_request(port, authorized(box, head), [body[:20], body[20:]], pause=0.3)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    chunked_head = (
        b"POST /api/v1/agents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    filler = b" " * 60_000
    chunks = [b"%x\r\n%s\r\n" % (len(filler), filler) for _ in range(2)] + [b"0\r\n\r\n"]
    reply = raw_request(port, authorized(box, chunked_head), chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    rest = rest_of(box)
    assert rest.get("/api/v1/agents/rest-split").status == 200
    rest.request("DELETE", "/api/v1/agents/rest-split")


def test_compressed_bodies_are_refused(rest: Rest) -> None:
    import gzip

    body = gzip.compress(b'{"agentId": "gz"}' + b" " * 1_000_000)
    reply = rest.post("/api/v1/agents", raw=body, headers={"Content-Encoding": "gzip"})
    assert_status(reply, 415, 3, "gzip")


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/api/v1/agents?pageSize=1_000", "pageSize"),
        ("/api/v1/agents?pageSize=%D9%A1", "pageSize"),
        ("/api/v1/agents?state=%D9%A2", "state"),
        ("/api/v1/agents?page_size=1&pageSize=2", "pageSize"),
    ],
)
def test_query_values_are_read_strictly(rest: Rest, path: str, named: str) -> None:
    assert_status(rest.get(path), 400, 3, named)


def test_json_is_read_strictly(rest: Rest) -> None:
    twice = b'{"agentId": "a1", "agentId": "a2", "spec": {"name": "x", "command": ["/bin/true"]}}'
    assert_status(rest.post("/api/v1/agents", raw=twice), 400, 3, "twice")
    spellings = b'{"agentId": "a1", "agent_id": "a2", "spec": {"name": "x", "command": ["/bin/true"]}}'
    assert_status(rest.post("/api/v1/agents", raw=spellings), 400, 3, "same field")
    huge = b'{"command": "ping", "params": {"a": 1e400}}'
    assert_status(rest.post("/api/v1/agents/rest-nobody/command", raw=huge), 400, 3, "out of range")


def test_a_bad_grpc_timeout_is_refused_and_a_good_one_ends_a_stream(rest: Rest) -> None:
    assert_status(rest.get("/api/v1/agents", headers={"Grpc-Timeout": "5s"}), 400, 3, "Grpc-Timeout")
    register(rest, "rest-deadline", TICKER, start=True)
    conn = rest.connection()
    began = time.monotonic()
    conn.request(
        "GET",
        "/api/v1/agents/rest-deadline/logs?follow=true&tailLines=1",
        headers=rest.with_token({"Grpc-Timeout": "1S"}),
    )
    lines = [json.loads(line) for line in conn.getresponse().read().splitlines()]
    assert time.monotonic() - began < 5
    assert lines[-1]["error"]["code"] == 4, lines[-1]
    assert any("result" in line for line in lines)
    conn.close()
    rest.post("/api/v1/agents/rest-deadline/stop")


def test_a_manifest_path_is_read_only_if_it_is_a_small_regular_file(box: Sandbox, rest: Rest) -> None:
    fifo = Path(box.root) / "manifest.fifo"
    os.mkfifo(fifo)
    began = time.monotonic()
    assert_status(rest.post("/api/v1/agents", {"manifestPath": str(fifo)}), 400, 3, "not a regular file")
    assert_status(rest.post("/api/v1/agents", {"manifestPath": "/dev/zero"}), 400, 3, "not a regular file")
    assert time.monotonic() - began < 5
    big = Path(box.root) / "big.yaml"
    big.write_text("name: big\n" + "#" * 2_000_000)
    assert_status(rest.post("/api/v1/agents", {"manifestPath": str(big)}), 400, 3, "at most")
    secret = Path(box.root) / "secret.txt"
    secret.write_text("root:$6$hash-that-must-not-leak:20228:0:99999:7:::\nopmas_token: hunter2\n")
    body = rest.post("/api/v1/agents", {"manifestPath": str(secret)}).json()
    assert "hash-that-must-not-leak" not in json.dumps(body) and "hunter2" not in json.dumps(body), body
    long = "/" + "x" * 300 + "/agent.yaml"
    assert_status(rest.post("/api/v1/agents", {"manifestPath": long}), 400, 3, "too long")
