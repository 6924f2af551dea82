"""The OpenAPI document: valid, faithful to the descriptors, and generated for any annotated proto."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import grpc_tools
import jsonschema
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_tools import protoc
from openapi_spec_validator import validate

from opmas.v1 import agents_pb2 as pb
from opmasd.api import convert
from opmasd.api.rest.comments import Comments, load_descriptor_set
from opmasd.api.rest.openapi import NDJSON_MEDIA, openapi_document, openapi_path
from opmasd.api.rest.rules import routes_of
from opmasd.api.rest.templates import parse_template
from opmasd.api.rest.transcode import message_json

AGENTS = pb.DESCRIPTOR.services_by_name["AgentService"]
REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    document: dict[str, Any] = openapi_document(routes_of([AGENTS]), "OPMAS", "0.1.0", load_descriptor_set())
    return document


def _parameter(operation: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = (p for p in operation["parameters"] if p["name"] == name)
    return found


def _conforms(doc: dict[str, Any], component: str, message: Message) -> None:
    """The message as the gateway writes it validates against the documented component schema."""
    instance = message_json(message)
    schema = {"$ref": REF + component, "components": doc["components"]}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(instance)


def test_the_document_validates(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"].startswith("3.1")


def test_every_annotated_rpc_has_one_operation(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert sorted(ids) == sorted(m.name for m in AGENTS.methods)
    assert doc["paths"]["/api/v1/agents:discover"]["post"]["operationId"] == "DiscoverAgents"


def test_path_parameter(doc: dict[str, Any]) -> None:
    operation = doc["paths"]["/api/v1/agents/{agent_id}"]["get"]
    param = _parameter(operation, "agent_id")
    assert param["in"] == "path" and param["required"] is True
    assert param["schema"] == {"type": "string"}


def test_enum_query_parameter(doc: dict[str, Any]) -> None:
    operation = doc["paths"]["/api/v1/agents"]["get"]
    state = _parameter(operation, "state")
    assert state["in"] == "query" and state["required"] is False
    assert state["schema"] == {"$ref": REF + "opmas.v1.AgentState"}
    enum = doc["components"]["schemas"]["opmas.v1.AgentState"]
    assert enum["type"] == "string"
    assert enum["enum"] == [v.name for v in pb.AgentState.DESCRIPTOR.values]
    assert "`AGENT_STATE_BACKOFF`: Waiting out the restart backoff" in enum["description"]
    assert {p["name"] for p in operation["parameters"]} == {
        "state",
        "type",
        "node",
        "page_size",
        "page_token",
        "label_selector",
    }


def test_repeated_query_parameter(doc: dict[str, Any]) -> None:
    ids = _parameter(doc["paths"]["/api/v1/events"]["get"], "agent_ids")
    assert ids["schema"] == {"type": "array", "items": {"type": "string"}}
    assert (ids["style"], ids["explode"]) == ("form", True)


def test_body_star_leaves_out_the_path_fields(doc: dict[str, Any]) -> None:
    create = doc["paths"]["/api/v1/agents"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": REF + "opmas.v1.CreateAgentRequest"
    }
    assert "parameters" not in create  # body "*": nothing from the query
    stop = doc["paths"]["/api/v1/agents/{agent_id}/stop"]["post"]
    body = stop["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"timeout"}
    assert body["additionalProperties"] is False


def test_status_schema(doc: dict[str, Any]) -> None:
    status = doc["components"]["schemas"]["google.rpc.Status"]
    assert set(status["properties"]) == {"code", "message", "details"}
    assert status["properties"]["code"]["type"] == "integer"
    assert status["properties"]["details"]["items"] == {"$ref": REF + "google.protobuf.Any"}
    assert doc["components"]["schemas"]["google.protobuf.Any"]["required"] == ["@type"]
    for item in doc["paths"].values():
        for operation in item.values():
            error = operation["responses"]["default"]["content"]["application/json"]["schema"]
            assert error == {"$ref": REF + "google.rpc.Status"}


def test_streaming_response(doc: dict[str, Any]) -> None:
    responses = doc["paths"]["/api/v1/agents/{agent_id}/logs"]["get"]["responses"]
    (media,) = responses["200"]["content"]
    assert media == NDJSON_MEDIA == "application/x-ndjson"
    line = responses["200"]["content"][media]["schema"]
    assert line["properties"] == {
        "result": {"$ref": REF + "opmas.v1.LogLine"},
        "error": {"$ref": REF + "google.rpc.Status"},
    }
    assert (line["minProperties"], line["maxProperties"]) == (1, 1)
    unary = doc["paths"]["/api/v1/agents/{agent_id}"]["get"]["responses"]["200"]
    assert list(unary["content"]) == ["application/json"]


def test_comments_become_descriptions(doc: dict[str, Any]) -> None:
    logs = doc["paths"]["/api/v1/agents/{agent_id}/logs"]["get"]
    assert logs["summary"].startswith("The last tail_lines lines of the agent's output")
    assert "newline-delimited JSON" in logs["description"]
    assert _parameter(logs, "tail_lines")["description"].startswith("How many lines from the end of the log")
    spec = doc["components"]["schemas"]["opmas.v1.AgentSpec"]
    assert spec["description"].startswith("What an agent is and how to run it")
    assert "before SIGKILL" in spec["properties"]["stopTimeout"]["description"]
    assert doc["tags"][0]["name"] == "AgentService" and "agent id" in doc["tags"][0]["description"]


def test_every_field_and_method_of_the_proto_is_documented() -> None:
    comments = Comments(load_descriptor_set())
    missing = [m.full_name for m in AGENTS.methods if not comments.of(m.full_name)]
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        missing += [message.full_name] * (not comments.of(message.full_name))
        missing += [f.full_name for f in message.fields if not comments.of(f.full_name)]
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        missing += [
            f"{enum.full_name}.{v.name}" for v in enum.values if not comments.of(f"{enum.full_name}.{v.name}")
        ]
    assert not missing, f"undocumented in agents.proto: {missing}"


def test_json_mapping_of_fields(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    status = schemas["opmas.v1.AgentStatus"]["properties"]
    assert status["stateChangeTime"]["format"] == "date-time"
    # An unset message field is written as null (grpc-gateway's EmitUnpopulated), so it may be null.
    assert status["uptime"]["type"] == ["string", "null"] and status["uptime"]["pattern"].endswith("s$")
    assert status["lastExit"]["anyOf"] == [{"$ref": REF + "opmas.v1.ExitInfo"}, {"type": "null"}]
    assert status["pid"]["type"] == "integer"
    assert schemas["opmas.v1.AgentMetrics"]["properties"]["rssBytes"]["type"] == "string"  # uint64
    assert schemas["opmas.v1.AgentMetrics"]["properties"]["reported"]["type"] == ["object", "null"]
    env = schemas["opmas.v1.AgentSpec"]["properties"]["environment"]
    assert env["type"] == "object" and env["additionalProperties"] == {"type": "string"}
    assert "opmas.v1.AgentSpec.EnvironmentEntry" not in schemas
    assert "description" in schemas["opmas.v1.SendCommandResponse"]["properties"]["result"]  # Value: any


def test_what_the_gateway_writes_conforms(doc: dict[str, Any]) -> None:
    agent = pb.Agent(
        agent_id="a1", spec=pb.AgentSpec(name="a", command=["/bin/true"], environment={"X": "1"})
    )
    agent.status.uptime.FromSeconds(3)
    agent.status.state_change_time.GetCurrentTime()
    _conforms(doc, "opmas.v1.ListAgentsResponse", pb.ListAgentsResponse(agents=[agent, pb.Agent()]))
    metrics = pb.AgentMetrics(agent_id="a1", rss_bytes=2**40, cpu_percent=12.5)
    json_format.ParseDict({"load": [1, None, "x", {"y": True}]}, metrics.reported)
    _conforms(doc, "opmas.v1.AgentMetrics", metrics)
    _conforms(
        doc, "opmas.v1.SendCommandResponse", pb.SendCommandResponse(result=convert.to_value({"k": [1]}))
    )
    error = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad")
    error.details.add().Pack(
        error_details_pb2.BadRequest(field_violations=[{"field": "spec.name", "description": "empty"}])
    )
    _conforms(doc, "google.rpc.Status", error)
    with pytest.raises(jsonschema.ValidationError):  # the schemas are strict: unknown keys fail
        jsonschema.validate(
            {"agentId": "a", "bogus": 1}, {"$ref": REF + "opmas.v1.LogLine", "components": doc["components"]}
        )


def test_without_a_descriptor_set_the_document_still_validates() -> None:
    bare = openapi_document(routes_of([AGENTS]), "OPMAS", "0.1.0", None)
    validate(bare)
    assert "summary" not in bare["paths"]["/api/v1/agents"]["get"]


# -- a proto that exists only in this test -------------------------------------------------------

LIBRARY_PROTO = """
syntax = "proto3";
package openapitest.v1;

import "google/api/annotations.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";

// Shelves of books.
service Library {
  // Gets one book.
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = {
      get: "/v1/{book.name=shelves/*/books/*}"
      additional_bindings {get: "/v1/books/{book.name}"}
    };
  }
  // Changes a book.
  rpc UpdateBook(UpdateBookRequest) returns (Book) {
    option (google.api.http) = {
      patch: "/v1/{book.name=shelves/*/books/*}"
      body: "book"
    };
  }
  // Publishes a book and answers only when.
  rpc PublishBook(PublishBookRequest) returns (PublishBookResponse) {
    option (google.api.http) = {
      post: "/v1/{name=shelves/*/books/*}:publish"
      body: "*"
      response_body: "publish_time"
    };
  }
  rpc ReadBook(ReadBookRequest) returns (stream Page) {
    option (google.api.http) = {get: "/v1/{name=shelves/*/books/*}/pages"};
  }
  rpc ListBooks(ListBooksRequest) returns (ListBooksResponse) {
    option (google.api.http) = {
      get: "/v1/{parent=shelves/*}/books"
      additional_bindings {get: "/v1/books"}
    };
  }
  rpc NotOverRest(GetBookRequest) returns (Book);
}

enum Genre {
  GENRE_UNSPECIFIED = 0;
  // Made up.
  GENRE_FICTION = 1;
  GENRE_POETRY = 2;
}

// A book.
message Book {
  // shelves/{shelf}/books/{book}
  string name = 1;
  string title = 2;
  repeated Genre genres = 3;
  int64 words = 4;
  oneof origin {
    string author = 5;
    // When nobody knows.
    bool anonymous = 6;
  }
  optional string isbn = 7;
  bytes cover = 8;
}

message GetBookRequest { Book book = 1; }
message UpdateBookRequest {
  Book book = 1;
  google.protobuf.FieldMask update_mask = 2;
}
message PublishBookRequest {
  string name = 1;
  google.protobuf.Timestamp when = 2;
}
message PublishBookResponse { google.protobuf.Timestamp publish_time = 1; }
message ReadBookRequest { string name = 1; }
message Page { string text = 1; }
message Filter {
  string author = 1;
  repeated Genre genres = 2;
  Filter nested = 3;
}
message ListBooksRequest {
  string parent = 1;
  Filter filter = 2;
  int32 page_size = 3;
  google.protobuf.Duration max_age = 4;
  map<string, string> labels = 5;
  google.protobuf.Struct extra = 6;
  repeated Book examples = 7;
}
message ListBooksResponse { repeated Book books = 1; }
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("proto")
    (root / "openapitest").mkdir()
    (root / "openapitest" / "library.proto").write_text(textwrap.dedent(LIBRARY_PROTO))
    googleapis = Path(annotations_pb2.__file__).resolve().parent.parent.parent
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out = root / "library.binpb"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{googleapis}",
        f"-I{well_known}",
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        "openapitest/library.proto",
    ]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: nothing registered globally
    for file in files.file:
        pool.Add(file)
    service = pool.FindServiceByName("openapitest.v1.Library")
    return openapi_document(routes_of([service]), "Library", "1", files)


def test_test_only_proto_gives_its_paths(library: dict[str, Any]) -> None:
    validate(library)
    operations = {
        path: {verb: op["operationId"] for verb, op in item.items()}
        for path, item in library["paths"].items()
    }
    assert operations == {
        "/v1/{book.name}": {"get": "GetBook", "patch": "UpdateBook"},
        "/v1/books/{book.name}": {"get": "GetBook_2"},
        "/v1/{name}:publish": {"post": "PublishBook"},
        "/v1/{name}/pages": {"get": "ReadBook"},
        "/v1/{parent}/books": {"get": "ListBooks"},
        "/v1/books": {"get": "ListBooks_2"},
    }


def test_nested_path_variable(library: dict[str, Any]) -> None:
    get = library["paths"]["/v1/{book.name}"]["get"]
    name = _parameter(get, "book.name")
    assert name["in"] == "path"
    assert name["schema"]["pattern"] == "^shelves/[^/]+/books/[^/]+$"
    assert "shelves/*/books/*" in name["description"]
    assert (
        "pattern" not in _parameter(library["paths"]["/v1/books/{book.name}"]["get"], "book.name")["schema"]
    )
    # The rest of the request's message is in the query, by dotted names.
    query = {p["name"] for p in get["parameters"] if p["in"] == "query"}
    assert query == {
        "book.title",
        "book.genres",
        "book.words",
        "book.author",
        "book.anonymous",
        "book.isbn",
        "book.cover",
    }


def test_body_field(library: dict[str, Any]) -> None:
    update = library["paths"]["/v1/{book.name}"]["patch"]
    body = update["requestBody"]["content"]["application/json"]["schema"]
    assert "name" not in body["properties"] and "title" in body["properties"]  # the path binds book.name
    assert [p["name"] for p in update["parameters"]] == ["book.name", "update_mask"]
    assert _parameter(update, "update_mask")["schema"]["type"] == "string"  # FieldMask


def test_response_body_and_custom_verb(library: dict[str, Any]) -> None:
    publish = library["paths"]["/v1/{name}:publish"]["post"]
    assert publish["summary"] == "Publishes a book and answers only when."
    body = publish["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"when"}
    ok = publish["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["type"] == "string" and ok["format"] == "date-time"


def test_streaming_and_query_mapping(library: dict[str, Any]) -> None:
    pages = library["paths"]["/v1/{name}/pages"]["get"]["responses"]["200"]["content"]
    assert pages[NDJSON_MEDIA]["schema"]["properties"]["result"] == {"$ref": REF + "openapitest.v1.Page"}
    listing = library["paths"]["/v1/books"]["get"]
    params = {p["name"]: p for p in listing["parameters"]}
    # Nested messages by dotted names; a recursive field (filter.nested), maps, Struct and repeated
    # messages have no query form and are left out.
    assert set(params) == {"parent", "filter.author", "filter.genres", "page_size", "max_age"}
    assert params["filter.genres"]["schema"] == {
        "type": "array",
        "items": {"$ref": REF + "openapitest.v1.Genre"},
    }
    assert params["max_age"]["schema"]["pattern"].endswith("s$")


def test_message_schema_of_the_test_proto(library: dict[str, Any]) -> None:
    book = library["components"]["schemas"]["openapitest.v1.Book"]
    props = book["properties"]
    assert props["words"]["type"] == "string" and props["words"]["format"] == "int64"
    assert props["cover"]["format"] == "byte"
    assert "Part of oneof `origin`" in props["anonymous"]["description"]
    assert "oneof" not in props.get("isbn", {}).get("description", "")  # proto3 optional: no real oneof
    assert book["allOf"] == [{"not": {"anyOf": [{"required": ["author", "anonymous"]}]}}]
    assert library["components"]["schemas"]["openapitest.v1.Genre"]["enum"][1] == "GENRE_FICTION"
    book_dict = {"name": "shelves/1/books/2", "author": "x", "anonymous": True}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            book_dict, {"$ref": REF + "openapitest.v1.Book", "components": library["components"]}
        )


@pytest.mark.parametrize(
    ("template", "path", "patterns"),
    [
        ("/api/v1/agents/{agent_id}", "/api/v1/agents/{agent_id}", {}),
        (
            "/v1/{book.name=shelves/*/books/*}:publish",
            "/v1/{book.name}:publish",
            {"book.name": "^shelves/[^/]+/books/[^/]+$"},
        ),
        ("/v1/{name=files/**}", "/v1/{name}", {"name": "^files(/.*)?$"}),
        ("/v1/*/books", "/v1/{_1}/books", {"_1": "^[^/]+$"}),
    ],
)
def test_openapi_path(template: str, path: str, patterns: dict[str, str]) -> None:
    assert openapi_path(parse_template(template)) == (path, patterns)
