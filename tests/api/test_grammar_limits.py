"""What a grammar may cost over HTTP: bounds refused with a 400 naming the bound and the field, one
compilation at a time per account, and a compilation stopped when its client leaves.

A tiny random Mistral with the real v3 tokenizer (its 32k vocabulary is what makes a grammar slow),
under a real uvicorn, with two accounts."""

import json
import socket

from fastapi.testclient import TestClient
import httpx
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.grammar_bounds import MAX_SCHEMA_DEPTH, MAX_SCHEMA_ENUM_ENTRIES, MAX_SCHEMA_PROPERTIES
from mistral_serve.engine.grammar_worker_pool import GrammarWorkerPool
from mistral_serve.engine.params import MAX_TOOLS
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, bearer, chat, new_key, serving, wait_until
from tests.engine.helpers import nested, object_with

# compiles for tens of seconds on a 32k vocabulary, though only 37 bytes long: what no bound sees
SLOW = {"type": "string", "pattern": "^([a-z]{1,20}[0-9]{0,30}){1,50}$"}


def named(name: str) -> dict:
    return {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}


def answer_as(schema: dict, **fields) -> dict:
    return chat(response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
                max_tokens=4, **fields)


def call_with(parameters: dict, num_tools: int = 1) -> dict:
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": parameters}} for i in range(num_tools)]
    return chat(tools=tools, tool_choice="required", max_tokens=4)


@pytest.fixture(scope="module")
def pool(v3_engine):
    # a timeout far past what the tests wait for: only a client leaving can stop a compilation early
    return GrammarWorkerPool(v3_engine.tokenizer, v3_engine.grammars.vocab_size, timeout_s=300)


@pytest.fixture(scope="module")
def url(v3_engine, pool, api_db, tmp_path_factory):
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")),
                     {MODEL_ID: AsyncEngine(v3_engine, grammar_workers=pool)}, api_db)
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def keys(api_db) -> tuple[str, str]:
    """Keys of two accounts."""
    return new_key(api_db, email="first@example.com"), new_key(api_db, email="second@example.com")


def post(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key), timeout=120)


def post_and_stay(url: str, key: str, body: dict) -> socket.socket:
    """Send the request on a socket of its own and return the socket, unread: closing it is the
    client leaving."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("body, bound, param", [
    (answer_as(object_with(MAX_SCHEMA_PROPERTIES + 1)), "max_schema_properties", "response_format"),
    (answer_as({"enum": list(range(MAX_SCHEMA_ENUM_ENTRIES + 1))}), "max_schema_enum_entries", "response_format"),
    (answer_as(nested(MAX_SCHEMA_DEPTH + 1)), "max_schema_depth", "response_format"),
    (answer_as({"type": "string", "description": "x" * (64 << 10)}), "max_schema_bytes", "response_format"),
    # parameters within the bound, but the forced calls' grammar wraps them a few levels deeper
    # (the tiny model's context is too short for tools past the other bounds: they are in the prompt)
    (call_with(nested(MAX_SCHEMA_DEPTH)), "max_schema_depth", "tools"),
])
def test_a_grammar_past_a_bound_is_a_400_naming_the_bound_and_the_field_and_compiles_nothing(
        url, keys, pool, body, bound, param):
    response = post(url, keys[0], body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("grammar_too_large", param)
    assert bound in error["message"]
    assert pool.num_compilations == 0


def test_more_tools_than_the_bound_is_a_400_naming_it(url, keys):
    response = post(url, keys[0], call_with({"type": "object"}, num_tools=MAX_TOOLS + 1))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools" and "max_tools" in error["message"]


def test_one_compilation_per_account_at_a_time_another_account_unaffected_and_a_client_leaving_stops_it(
        url, keys, pool):
    first, second = keys
    slow = post_and_stay(url, first, answer_as(SLOW))
    try:
        assert wait_until(lambda: pool.num_compiling == 1, timeout=60)
        worker_pids = pool.worker_pids

        refused = post(url, first, answer_as(named("a")))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_compilations" and refused.headers["Retry-After"]

        answered = post(url, second, answer_as(named("a")))  # the other account's schema compiles meanwhile
        assert answered.status_code == 200, answered.text
        # a schema compiled already needs no compiler: the first account is not held up for it
        assert post(url, first, answer_as(named("a"))).status_code == 200
        assert pool.num_compiling == 1  # the slow one still runs
    finally:
        slow.close()  # the client leaves
    assert wait_until(lambda: pool.num_compiling == 0, timeout=30)
    assert not set(worker_pids) & set(pool.worker_pids)  # the worker that compiled it was killed
    assert post(url, first, answer_as(named("c"))).status_code == 200  # the account may compile again


def test_a_compilation_past_the_time_limit_is_a_400_grammar_too_complex(make_engine, api_db, tmp_path_factory):
    engine = make_engine()
    # far less time than any compilation takes, counted from the spec reaching a ready worker
    pool = GrammarWorkerPool(engine.tokenizer, engine.grammars.vocab_size, timeout_s=1e-4)
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")),
                     {MODEL_ID: AsyncEngine(engine, grammar_workers=pool)}, api_db)
    with TestClient(app, headers=bearer(new_key(api_db, email="third@example.com"))) as client:
        response = client.post("/v1/chat/completions", json=answer_as(SLOW))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("grammar_too_complex", "response_format")
    assert "compile_timeout_s" in error["message"]
