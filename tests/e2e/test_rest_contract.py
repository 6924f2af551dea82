"""The HTTP contract of a real opmasd: its OpenAPI document, /metrics, /healthz and /readyz, schemathesis.

- The document validates as OpenAPI, documents every route the gateway serves, and what the
  daemon answers (results and errors) validates against the document's own schemas.
- /metrics parses with prometheus-client's parser and counts gRPC and REST calls alike.
- schemathesis drives every operation but the endless streams against the live server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import referencing
import referencing.jsonschema
from openapi_spec_validator import validate as validate_openapi
from prometheus_client.parser import text_string_to_metric_families

from opmas.v1 import agents_pb2 as pb
from opmasd.api.auth import SERVICES
from opmasd.api.rest.rules import routes_of

from .harness import Sandbox, call_error, sleeper, wait_for
from .rest_client import Reply, Rest, rest_of, rest_sandbox

pytestmark = pytest.mark.timeout(90)

OPENAPI = "/api/v1/openapi.json"
DOC_URI = "urn:opmas:openapi"
JSON_MEDIA = "application/json"
NDJSON_MEDIA = "application/x-ndjson"
SERVICE = "opmas.v1.AgentService"
# The whole schemathesis run, daemon start excluded; it takes ~20-30 s on two shared cores.
SCHEMATHESIS_TIMEOUT = 120
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with rest_sandbox("rest-contract") as b:
        yield b


@pytest.fixture
def rest(box: Sandbox) -> Iterator[Rest]:
    client = rest_of(box)
    yield client
    client.close()


@pytest.fixture(scope="module")
def document(box: Sandbox) -> dict[str, Any]:
    client = rest_of(box)
    reply = client.get(OPENAPI)
    client.close()
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith(JSON_MEDIA)
    return reply.json()  # type: ignore[no-any-return]


def register(rest: Rest, agent_id: str, start: bool = False) -> dict[str, Any]:
    reply = rest.post(
        "/api/v1/agents",
        {"agentId": agent_id, "spec": {"name": agent_id, "command": sleeper(), "type": "e2e-contract"}},
    )
    assert reply.status == 200, reply.body
    if start:
        started = rest.post(f"/api/v1/agents/{agent_id}/start")
        assert started.status == 200, started.body
    return reply.json()  # type: ignore[no-any-return]


# -- the OpenAPI document -----------------------------------------------------------------------


def openapi_path(template_source: str) -> str:
    """A route's path template as OpenAPI writes it: "{name=things/*}" becomes "{name}"."""
    return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", template_source)


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate_openapi(document)  # raises OpenAPIValidationError with the path to the fault


def test_every_gateway_route_is_documented(document: dict[str, Any]) -> None:
    routes = routes_of(SERVICES)  # every service the daemon serves: agents and tokens
    assert len(routes) >= 17
    served = set()
    for route in routes:
        path, verb = openapi_path(route.template.source), route.http_method.lower()
        served.add((path, verb))
        assert path in document["paths"], f"{route.http_method} {route.template.source} is not documented"
        operation = document["paths"][path].get(verb)
        assert operation is not None, f"{route.http_method} {path} is not documented"
        assert operation["operationId"] == route.method.name
        in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert in_path == set(route.template.variables), (path, in_path)
        assert "200" in operation["responses"] and "default" in operation["responses"]
    documented = {(p, v) for p, item in document["paths"].items() for v in item if v != "parameters"}
    assert documented == served, documented ^ served


class Contract:
    """Validates bodies against the schemas of the document's operations, $refs resolved in it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = referencing.Resource.from_contents(
            document, default_specification=referencing.jsonschema.DRAFT202012
        )
        self.registry: referencing.Registry[Any] = referencing.Registry().with_resource(DOC_URI, resource)

    def schema(self, method: str, path: str, status: str, media: str = JSON_MEDIA) -> dict[str, Any]:
        """A reference to the schema of one response of an operation, resolved within the document
        (so that its own "#/components/..." references resolve as they do there)."""
        where = ["paths", path, method.lower(), "responses", status, "content", media, "schema"]
        node: Any = self.document
        for key in where:
            assert key in node, f"the document has no {'/'.join(where)}"
            node = node[key]
        pointer = "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in where)
        return {"$ref": f"{DOC_URI}#{pointer}"}

    def check(self, schema: dict[str, Any], value: Any) -> None:
        validator = jsonschema.Draft202012Validator(
            schema, registry=self.registry, format_checker=jsonschema.FormatChecker()
        )
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10]
        )

    def reply(self, method: str, path: str, reply: Reply) -> None:
        """A JSON reply of the operation: 200 against its result, anything else its error schema."""
        assert reply.headers["content-type"].startswith(JSON_MEDIA), reply.headers
        status = "200" if reply.status == 200 else "default"
        self.check(self.schema(method, path, status), reply.json())


def test_live_answers_validate_against_the_document(document: dict[str, Any], rest: Rest) -> None:
    contract = Contract(document)
    register(rest, "contract-a")
    register(rest, "contract-b", start=True)

    listed = rest.get("/api/v1/agents?type=e2e-contract")
    assert listed.status == 200 and len(listed.json()["agents"]) == 2
    contract.reply("GET", "/api/v1/agents", listed)
    for agent_id in ("contract-a", "contract-b"):
        got = rest.get(f"/api/v1/agents/{agent_id}")
        assert got.status == 200
        contract.reply("GET", "/api/v1/agents/{agent_id}", got)
        status = rest.get(f"/api/v1/agents/{agent_id}/status")
        assert status.status == 200
        contract.reply("GET", "/api/v1/agents/{agent_id}/status", status)
        metrics = rest.get(f"/api/v1/agents/{agent_id}/metrics")
        assert metrics.status == 200
        contract.reply("GET", "/api/v1/agents/{agent_id}/metrics", metrics)

    # Errors: NOT_FOUND with ResourceInfo, INVALID_ARGUMENT with BadRequest, both google.rpc.Status.
    missing = rest.get("/api/v1/agents/contract-nobody")
    assert missing.status == 404
    contract.reply("GET", "/api/v1/agents/{agent_id}", missing)
    bad = rest.post(
        "/api/v1/agents", {"agentId": "Not Valid!", "spec": {"name": "x", "command": ["/bin/true"]}}
    )
    assert bad.status == 400
    contract.reply("POST", "/api/v1/agents", bad)
    wrong_method = rest.request("PATCH", "/api/v1/agents/contract-a")
    assert wrong_method.status == 405
    contract.reply("GET", "/api/v1/agents/{agent_id}", wrong_method)

    # A stream: each NDJSON line validates against the documented line schema.
    logs = rest.get("/api/v1/agents/contract-b/logs?tailLines=5")
    assert logs.status == 200 and logs.headers["content-type"].startswith(NDJSON_MEDIA)
    line_schema = contract.schema("GET", "/api/v1/agents/{agent_id}/logs", "200", NDJSON_MEDIA)
    assert b"hello from contract-b" in logs.body, logs.body
    for line in logs.body.splitlines():
        contract.check(line_schema, json.loads(line))

    assert rest.post("/api/v1/agents/contract-b/stop").status == 200


def test_a_newline_in_the_path_reaches_the_gateway(rest: Rest) -> None:
    """An agent id with %0A in it is a malformed id like any other: 400 INVALID_ARGUMENT in the
    Status shape (as "a%0Db" is), and an unknown path with one is the gateway's JSON 404 —
    never aiohttp's own text/plain "404: Not Found" (schemathesis: ST105 Undocumented Content-Type)."""
    carriage_return = rest.get("/api/v1/agents/a%0Db")
    assert carriage_return.status == 400, carriage_return.body
    for path, status, code in (
        ("/api/v1/agents/a%0Ab", 400, 3),
        ("/api/v1/agents/a%0Ab/status", 400, 3),
        ("/api/v1/nothing%0Ahere", 404, 5),
    ):
        reply = rest.get(path)
        assert reply.headers["content-type"].startswith(JSON_MEDIA), (path, reply.status, reply.body)
        assert reply.status == status, (path, reply.body)
        assert reply.json()["code"] == code, (path, reply.body)


def test_a_malformed_request_is_a_400_not_a_logged_error(box: Sandbox) -> None:
    """A request that is not valid HTTP (here a NUL byte in a header value, as schemathesis' probe
    sends) is the client's fault: a 400, and nothing in the daemon's log above debug, let alone a
    traceback: any client could fill the error log at will (go's net/http, under grpc-gateway,
    answers 400 and logs nothing)."""
    port = box.rest_port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Probe: a\x00b\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.") and answer.split(b" ", 2)[1] == b"400", answer
    time.sleep(0.3)  # the daemon's log lines reach its stderr file
    logged = [
        record
        for record in box.daemon.log_events()
        if record.get("logger") == "aiohttp.server" and record.get("level") not in ("debug", None)
    ]
    assert not logged, logged


# -- /metrics -----------------------------------------------------------------------------------


def scrape(rest: Rest) -> dict[str, Any]:
    """Every sample of /metrics, parsed by prometheus-client: {sample name: [(labels, value)]}."""
    reply = rest.get("/metrics")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain"), reply.headers
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def rpc_counts(samples: dict[str, Any]) -> Counter[tuple[str, str, str]]:
    return Counter(
        {
            (labels["method"], labels["code"], labels["transport"]): value
            for labels, value in samples.get("opmas_rpc_requests_total", [])
        }
    )


def agents_by_state(box: Sandbox) -> Counter[str]:
    """What ListAgents says, as opmas_agents' state label writes it ("running", "stopped", ...)."""
    counts: Counter[str] = Counter()
    token = ""
    while True:
        page = box.stub.ListAgents(pb.ListAgentsRequest(page_size=500, page_token=token), timeout=10)
        for agent in page.agents:
            counts[pb.AgentState.Name(agent.status.state).removeprefix("AGENT_STATE_").lower()] += 1
        token = page.next_page_token
        if not token:
            return counts


def test_metrics_count_grpc_and_rest_calls_alike(box: Sandbox, rest: Rest) -> None:
    register(rest, "metrics-agent")
    before = rpc_counts(scrape(rest))

    stub = box.stub
    stub.GetAgent(pb.GetAgentRequest(agent_id="metrics-agent"), timeout=10)
    stub.GetAgent(pb.GetAgentRequest(agent_id="metrics-agent"), timeout=10)
    stub.ListAgents(pb.ListAgentsRequest(), timeout=10)
    missing = call_error(lambda: stub.GetAgent(pb.GetAgentRequest(agent_id="metrics-nobody"), timeout=10))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert rest.get("/api/v1/agents/metrics-agent").status == 200
    assert rest.get("/api/v1/agents").status == 200
    assert rest.get("/api/v1/agents").status == 200
    assert rest.get("/api/v1/agents/metrics-nobody/status").status == 404
    assert rest.get("/api/v1/agents/metrics-nobody/status").status == 404

    delta = rpc_counts(scrape(rest)) - before
    expected = {
        (f"{SERVICE}/GetAgent", "OK", "grpc"): 2,
        (f"{SERVICE}/ListAgents", "OK", "grpc"): 1,
        (f"{SERVICE}/GetAgent", "NOT_FOUND", "grpc"): 1,
        (f"{SERVICE}/GetAgent", "OK", "rest"): 1,
        (f"{SERVICE}/ListAgents", "OK", "rest"): 2,
        (f"{SERVICE}/GetAgentStatus", "NOT_FOUND", "rest"): 2,
    }
    # Only what was called here (the harness' readiness probes are grpc.health calls).
    assert {k: v for k, v in delta.items() if k[0].startswith(SERVICE)} == expected, delta
    durations = {
        (labels["method"], labels["code"], labels["transport"])
        for labels, _ in scrape(rest).get("opmas_rpc_duration_seconds_count", [])
    }
    assert set(expected) <= durations


def test_metrics_agents_nats_and_process(box: Sandbox, rest: Rest) -> None:
    register(rest, "metrics-stopped-1")
    register(rest, "metrics-stopped-2")
    register(rest, "metrics-running", start=True)
    register(rest, "metrics-deleted")
    assert rest.request("DELETE", "/api/v1/agents/metrics-deleted").status == 200

    def agreed() -> dict[str, Any] | None:
        samples = scrape(rest)
        gauge = Counter({labels["state"]: value for labels, value in samples["opmas_agents"] if value})
        return samples if gauge == agents_by_state(box) else None

    samples = wait_for(agreed, 10, what="opmas_agents to match ListAgents")
    gauge = {labels["state"]: value for labels, value in samples["opmas_agents"]}
    assert gauge["running"] >= 1 and gauge["stopped"] >= 2, gauge
    assert {"starting", "running", "stopping", "stopped", "error", "inactive", "backoff"} <= set(gauge)
    assert samples["opmas_nats_connected"] == [({}, 1.0)]
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert name in samples, sorted(samples)
    assert samples["process_open_fds"][0][1] > 0
    assert rest.post("/api/v1/agents/metrics-running/stop").status == 200


# -- /healthz, /readyz --------------------------------------------------------------------------


def test_health_and_readiness(rest: Rest) -> None:
    """Probes need no credentials; /metrics and the document are a viewer's (test_auth.py)."""
    alive = rest.get("/healthz", anonymous=True)
    assert alive.status == 200 and alive.headers["content-type"].startswith(JSON_MEDIA)
    assert alive.json() == {"status": "alive"}
    ready = rest.get("/readyz", anonymous=True)
    assert ready.status == 200, ready.body
    assert ready.json() == {"status": "ready", "checks": {"store": "ok", "bus": "ok", "grpc": "ok"}}
    for path in ("/healthz", "/readyz", "/metrics", OPENAPI):
        wrong = rest.post(path, anonymous=path not in ("/metrics", OPENAPI))
        assert wrong.status == 405, (path, wrong.body)
        assert "GET" in [m.strip() for m in wrong.headers["allow"].split(",")], wrong.headers
        assert wrong.json()["code"] == 12, wrong.body


# -- schemathesis -------------------------------------------------------------------------------

# GetAgentLogs is tested with follow forced to false (a followed log never ends); WatchEvents,
# which never ends either and has nothing to force, is left out. The hooks run before every call.
#
# SendCommand to a running agent that does not answer (schemathesis starts the sleepers the other
# tests registered, and they are no NATS agents) waits for the command's timeout, up to 300 s:
# a Grpc-Timeout bounds the wait below the request timeout, and the answer, DEADLINE_EXCEEDED as
# grpc-gateway's 504, is the right one for an agent that does not answer, not a server error.
HOOKS = textwrap.dedent(
    """
    import json
    import schemathesis
    from schemathesis.core.failures import ServerError

    @schemathesis.hook
    def before_call(context, case, kwargs):
        if case.operation.path.endswith("/logs"):
            query = case.query if isinstance(case.query, dict) else {}
            case.query = {**query, "follow": "false"}
        if case.operation.path.endswith("/command"):
            case.headers = {**(case.headers or {}), "Grpc-Timeout": "2S"}

    @schemathesis.hook
    def filter_failure(context, failure, case, response):
        if not (isinstance(failure, ServerError) and response.status_code == 504):
            return True
        try:
            code = json.loads(response.content).get("code")
        except ValueError:
            return True
        return not (case.operation.path.endswith("/command") and code == 4)
    """
)

# Kept: they pass on a correct server, and a failure is a bug of the server or of its document.
# Not kept: positive_data_acceptance and negative_data_rejection, because the document does not
# write down every rule the servicer checks (the agent id format, required fields, page_size >= 0),
# and it says enums are names while the gateway also takes numbers, as grpc-gateway does.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
)


@pytest.mark.timeout(SCHEMATHESIS_TIMEOUT + 30)
def test_schemathesis_finds_nothing(box: Sandbox, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{box.rest_port}"  # type: ignore[attr-defined]
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS)
    command = [
        str(SCHEMATHESIS),
        "run",
        base + OPENAPI,
        "--url",
        base,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--mode",
        "all",  # positive and negative data
        "--max-examples",
        os.environ.get("OPMAS_SCHEMATHESIS_EXAMPLES", "25"),
        "--checks",
        ",".join(CHECKS),
        "--exclude-operation-id",
        "WatchEvents",
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--header",
        f"Authorization: Bearer {box.admin_token()}",
    ]
    # A fixed seed by default, so that a run is reproducible; OPMAS_SCHEMATHESIS_SEED=random explores.
    seed = os.environ.get("OPMAS_SCHEMATHESIS_SEED", "3")
    if seed != "random":
        command += ["--seed", seed]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "NO_COLOR": "1", "COLUMNS": "120"}
    began = time.monotonic()
    try:
        run = subprocess.run(
            command,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=SCHEMATHESIS_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran over {SCHEMATHESIS_TIMEOUT}s:\n{exc.stdout or ''}\n{exc.stderr or ''}")
    took = time.monotonic() - began
    report = f"{' '.join(command)}\n(exit {run.returncode}, {took:.1f}s)\n{run.stdout}\n{run.stderr}"
    print(report)  # shown by pytest when the test fails
    assert run.returncode == 0, f"schemathesis exited {run.returncode}: its report is in the captured stdout"
    assert box.daemon.running
    after = rest_of(box)
    assert after.get("/readyz").status == 200
    after.close()
