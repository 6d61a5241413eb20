"""Bodies that fail validation get OpenAI's error envelope with the right 4xx and `param`.

What arrives at the socket (auth, methods, content types, encodings, sizes, nesting): test_hostile.py."""

import json

import pytest
from fastapi.testclient import TestClient

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, bearer, chat
from tests.api.helpers import BAD_REQUESTS, USER


@pytest.mark.parametrize("what, body, status, param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_the_envelope(client, what, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param, error


def test_unsupported_and_unknown_fields_are_named(client):
    tools = client.post("/v1/chat/completions", json=chat(tools=[])).json()["error"]
    assert "'tools'" in tools["message"] and tools["code"] == "unsupported_parameter"
    typo = client.post("/v1/chat/completions", json=chat(temprature=0.5)).json()["error"]
    assert "temprature" in typo["message"] and typo["code"] == "unknown_parameter"


HARMLESS_FIELDS = {"metadata": {"run": "nightly", "team": "search"}, "store": False, "service_tier": "auto",
                   "prompt_cache_key": "session-42", "safety_identifier": "user-hash-1", "modalities": ["text"],
                   "user": "someone"}


def test_fields_that_cannot_change_the_answer_are_accepted_and_ignored(client):
    plain = client.post("/v1/chat/completions", json=chat(max_tokens=3, temperature=0, seed=1))
    with_fields = client.post("/v1/chat/completions", json=chat(max_tokens=3, temperature=0, seed=1,
                                                                **HARMLESS_FIELDS))
    assert with_fields.status_code == 200, with_fields.text
    assert with_fields.json()["choices"] == plain.json()["choices"]


@pytest.mark.parametrize("field, value", [("store", True), ("reasoning_effort", "high"), ("verbosity", "low"),
                                          ("modalities", ["text", "audio"])])
def test_fields_that_would_change_the_answer_are_still_refused(client, field, value):
    response = client.post("/v1/chat/completions", json=chat(max_tokens=1, **{field: value}))
    assert response.status_code == 400 and response.json()["error"]["param"].split(".")[0] == field


def test_context_errors_say_by_how_much(client):
    prompt_tokens = len(b"<user>Hi")
    error = client.post("/v1/chat/completions", json=chat(messages=USER, max_tokens=CONTEXT_LENGTH)).json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"{prompt_tokens} too many" in error["message"] and str(CONTEXT_LENGTH) in error["message"]


def test_an_unknown_model_lists_the_served_ids(client):
    error = client.post("/v1/chat/completions", json=chat(model="gpt-4o")).json()["error"]
    assert error["code"] == "model_not_found"
    assert MODEL_ID in error["message"] and "open-mistral-7b" in error["message"]
    assert client.get("/v1/models/gpt-4o").json()["error"]["code"] == "model_not_found"


def test_a_server_that_is_not_ready_answers_503_with_retry_after(engine, api_db, tmp_path_factory, api_key):
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(engine)}, api_db)
    client = TestClient(app, headers=bearer(api_key))  # not entered: the lifespan has not started the engines
    for response in (client.post("/v1/chat/completions", json=chat()), client.get("/ready")):
        assert response.status_code == 503
        assert response.headers["retry-after"] and response.json()["error"]["type"] == "service_unavailable"
    assert client.get("/health").status_code == 200
