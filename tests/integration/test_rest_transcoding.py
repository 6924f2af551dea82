"""The REST transcoder on a proto that exists only in the tests: its google.api.http rules alone
make it appear over HTTP — nested path fields, `body: "field"`, `response_body`,
additional_bindings, a custom verb, every kind of query parameter, streaming — with no code of
its own. A real grpc.aio server and a real aiohttp server, on loopback."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import grpc
import pytest
from google.api import annotations_pb2
from grpc_tools import protoc

from opmasd.api.rest.gateway import RestGateway
from opmasd.api.rest.rules import RuleError, routes_of
from opmasd.api.rest.server import Endpoints, HttpListeners, HttpServer

PROTOS = Path(__file__).parent / "protos"


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    out = tmp_path_factory.mktemp("shelf_stubs")
    googleapis = Path(annotations_pb2.__file__).resolve().parent.parent.parent
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{googleapis}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "shelf/v1/shelf.proto",
        ]
    )
    assert status == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("shelf.v1.shelf_pb2"), importlib.import_module(
            "shelf.v1.shelf_pb2_grpc"
        )
    finally:
        sys.path.remove(str(out))


def servicer(pb: ModuleType, pb_grpc: ModuleType) -> Any:
    class Shelf(pb_grpc.ShelfServiceServicer):  # type: ignore[misc, name-defined]
        async def UpdateBook(self, request: Any, context: Any) -> Any:
            book = pb.Book()
            book.CopyFrom(request.book)
            if request.dry_run:
                book.title = "dry run: " + book.title
            return book

        async def SearchBooks(self, request: Any, context: Any) -> Any:
            echo = json.dumps(
                {
                    "in_print": request.in_print,
                    "min_rating": request.min_rating,
                    "max_age": request.max_age.ToNanoseconds(),
                    "after": request.after.seconds,
                    "limit": request.limit,
                }
            )
            book = pb.Book(
                name=request.shelf,
                tags=list(request.tags),
                genre=request.genre,
                author=request.author,
                title=echo,
            )
            return pb.SearchBooksResponse(books=[book], echo=echo)

        async def PublishBook(self, request: Any, context: Any) -> Any:
            return pb.Book(name=f"{request.shelf}/{request.book_id}", title=request.note)

        async def CountTo(self, request: Any, context: Any) -> AsyncIterator[Any]:
            if request.to < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "to: must not be negative")
            for n in range(1, request.to + 1):
                yield pb.Count(n=n)
            if request.fail_at_end:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the count failed at its end")

    return Shelf()


@pytest.fixture
async def http(shelf: tuple[ModuleType, ModuleType], tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    pb, pb_grpc = shelf
    server = grpc.aio.server()
    pb_grpc.add_ShelfServiceServicer_to_server(servicer(pb, pb_grpc), server)
    socket_path = tmp_path / "grpc.sock"
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
    routes = routes_of([pb.DESCRIPTOR.services_by_name["ShelfService"]])
    gateway = RestGateway(routes, channel, max_body_bytes=1024)
    web = HttpServer(gateway, Endpoints(openapi=dict), HttpListeners(address="127.0.0.1:0"), grace=1)
    await web.start()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{web.port}") as session:
        yield session
    await web.stop()
    await channel.close()
    await server.stop(0)


def test_every_annotated_method_and_binding_becomes_a_route(shelf: tuple[ModuleType, ModuleType]) -> None:
    pb, _ = shelf
    routes = routes_of([pb.DESCRIPTOR.services_by_name["ShelfService"]])
    assert {(r.http_method, r.template.source) for r in routes} == {
        ("PATCH", "/v1/{book.name=shelves/*/books/*}"),
        ("PUT", "/v1/books/{book.name=**}"),
        ("GET", "/v1/shelves/{shelf}/books"),
        ("POST", "/v1/shelves/{shelf}/books/{book_id}:publish"),
        ("GET", "/v1/count/{to}"),
    }
    assert not any(r.method.name == "Hidden" for r in routes)


async def test_nested_path_field_and_a_body_field(http: aiohttp.ClientSession) -> None:
    body = {"title": "Dune", "pages": "412", "genre": "GENRE_NOVEL", "author": {"name": "Herbert"}}
    async with http.patch("/v1/shelves/s1/books/b2?dryRun=true", json=body) as reply:
        assert reply.status == 200, await reply.text()
        book = await reply.json()
    assert book["name"] == "shelves/s1/books/b2"  # from the path, into the body's message
    assert book["title"] == "dry run: Dune"
    assert book["pages"] == "412"  # int64 as a string, as grpc-gateway writes it
    # Unpopulated fields are there: repeated as [], an unset message as null (protojson's way).
    assert book["tags"] == [] and book["published"] is None
    # the additional binding, with a multi-segment variable
    async with http.put("/v1/books/a/b/c", json={"title": "T"}) as reply:
        assert (await reply.json())["name"] == "a/b/c"


async def test_the_path_wins_over_the_body(http: aiohttp.ClientSession) -> None:
    async with http.patch("/v1/shelves/s1/books/b2", json={"name": "elsewhere", "title": "x"}) as reply:
        assert (await reply.json())["name"] == "shelves/s1/books/b2"


async def test_query_parameters_of_every_kind_and_response_body(http: aiohttp.ClientSession) -> None:
    query = (
        "tags=a&tags=b&genre=2&author.name=Ann&author.born=1970&in_print=true"
        "&minRating=4.5&maxAge=90s&after=2026-01-02T03:04:05Z&limit=9007199254740993"
    )
    async with http.get(f"/v1/shelves/poems/books?{query}") as reply:
        assert reply.status == 200, await reply.text()
        books = await reply.json()
    assert isinstance(books, list)  # response_body: the books field only
    book = books[0]
    assert book["name"] == "poems"
    assert book["tags"] == ["a", "b"]
    assert book["genre"] == "GENRE_POETRY"
    assert book["author"] == {"name": "Ann", "born": 1970}
    echo = json.loads(book["title"])
    assert echo == {
        "in_print": True,
        "min_rating": 4.5,
        "max_age": 90_000_000_000,
        "after": 1767323045,
        "limit": 9007199254740993,
    }


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("genre=GENRE_EPIC", "genre"),
        ("in_print=maybe", "in_print"),
        ("author.born=old", "author.born"),
        ("author=Ann", "author"),
        ("maxAge=soon", "maxAge"),
        ("shelf=other", "shelf"),
        ("nonsense=1", "nonsense"),
        ("genre=1&genre=2", "genre"),
    ],
)
async def test_bad_query_parameters_are_400_naming_them(
    http: aiohttp.ClientSession, query: str, named: str
) -> None:
    async with http.get(f"/v1/shelves/s/books?{query}") as reply:
        assert reply.status == 400, await reply.text()
        body = await reply.json()
    assert body["code"] == 3
    assert named in body["message"], body
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"


async def test_custom_verb_with_body_star(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/shelves/s/books/b:publish", json={"note": "now"}) as reply:
        assert await reply.json() == {
            "name": "s/b",
            "title": "now",
            "pages": "0",
            "genre": "GENRE_UNSPECIFIED",
            "author": None,
            "tags": [],
            "published": None,
        }
    async with http.post("/v1/shelves/s/books/b:publish?note=x", json={}) as reply:
        assert reply.status == 400  # body "*": every field comes from the body


async def test_server_streaming_as_ndjson(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/count/3") as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await reply.text()).splitlines()]
    assert lines == [{"result": {"n": 1}}, {"result": {"n": 2}}, {"result": {"n": 3}}]
    async with http.get("/v1/count/2?failAtEnd=true") as reply:
        lines = [json.loads(line) for line in (await reply.text()).splitlines()]
    assert lines[:2] == [{"result": {"n": 1}}, {"result": {"n": 2}}]
    assert lines[2]["error"]["code"] == 9 and "failed at its end" in lines[2]["error"]["message"]
    async with http.get("/v1/count/-1") as reply:  # refused before any message: its own status
        assert reply.status == 400
        assert (await reply.json())["message"] == "to: must not be negative"


async def test_body_limit_content_type_and_routing_errors(http: aiohttp.ClientSession) -> None:
    async with http.patch("/v1/shelves/s/books/b", json={"title": "x" * 2000}) as reply:
        assert reply.status == 413
    async with http.patch(
        "/v1/shelves/s/books/b", data=b"title=x", headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415
    async with http.get("/v1/shelves/s/books/b") as reply:
        assert reply.status == 405 and reply.headers["Allow"] == "PATCH"
    async with http.get("/v2/anything") as reply:
        assert reply.status == 404 and (await reply.json())["code"] == 5


def test_a_rule_that_cannot_be_served_is_refused_at_start(shelf: tuple[ModuleType, ModuleType]) -> None:
    from opmasd.api.rest.rules import _route

    pb, _ = shelf
    method = pb.DESCRIPTOR.services_by_name["ShelfService"].methods_by_name["SearchBooks"]
    from google.api import http_pb2

    with pytest.raises(RuleError, match="no field"):
        _route(method, http_pb2.HttpRule(get="/v1/{nope}"))
    with pytest.raises(RuleError, match="repeated"):
        _route(method, http_pb2.HttpRule(get="/v1/{tags}"))
    with pytest.raises(RuleError, match="'\\*\\*' must be the last"):
        _route(method, http_pb2.HttpRule(get="/v1/{shelf=**}/x"))


async def test_connections_past_the_cap_are_closed_and_the_server_keeps_answering(
    shelf: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    pb, _ = shelf
    channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'none.sock'}")
    routes = routes_of([pb.DESCRIPTOR.services_by_name["ShelfService"]])
    web = HttpServer(
        RestGateway(routes, channel, 1024),
        Endpoints(openapi=dict),
        HttpListeners(address="127.0.0.1:0"),
        grace=1,
        max_connections=3,
    )
    await web.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", web.port) for _ in range(3)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        # Closed unanswered (an EOF, or a reset if our request raced the close).
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await asyncio.sleep(0.1)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{web.port}/healthz") as r,
        ):
            assert r.status == 200
    finally:
        await web.stop()
        await channel.close()
