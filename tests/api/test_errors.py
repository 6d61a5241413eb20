"""Bodies that fail validation get OpenAI's error envelope with the right 4xx and `param`.

What arrives at the socket (auth, methods, content types, encodings, sizes, nesting): test_hostile.py."""

import json

import pytest
from fastapi.testclient import TestClient

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, bearer, chat

USER = [{"role": "user", "content": "Hi"}]

# (what, body, status, param): the body is a dict (sent as JSON) or raw bytes
BAD_REQUESTS = [
    ("no body", b"", 400, None),
    ("not JSON", b"{model: x}", 400, None),
    ("truncated JSON", b'{"model": "x", "messages": [', 400, None),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "messages": []}', 400, None),
    ("a JSON array", b"[1, 2]", 400, None),
    ("a JSON string", b'"hello"', 400, None),
    ("NaN temperature", b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400,
     "temperature"),
    ("no model", {"messages": USER}, 400, "model"),
    ("no messages", {"model": MODEL_ID}, 400, "messages"),
    ("empty messages", chat(messages=[]), 400, "messages"),
    ("messages not a list", chat(messages="Hi"), 400, "messages"),
    ("a message not an object", chat(messages=["Hi"]), 400, "messages.0"),
    ("unknown role", chat(messages=[{"role": "bot", "content": "Hi"}]), 400, "messages.0"),
    ("no role", chat(messages=[{"content": "Hi"}]), 400, "messages.0"),
    ("user without content", chat(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("content a number", chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("image part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0.content.0.type"),
    ("tool message without id", chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.tool_call_id"),
    ("unknown message field", chat(messages=[{"role": "user", "content": "a", "mood": "x"}]), 400,
     "messages.0.mood"),
    ("assistant last (template refuses)", chat(messages=[{"role": "assistant", "content": "Hi"}]), 400, "messages"),
    ("model a number", chat(model=7), 400, "model"),
    ("temperature a string", chat(temperature="hot"), 400, "temperature"),
    ("temperature too high", chat(temperature=2.5), 400, "temperature"),
    ("temperature negative", chat(temperature=-1), 400, "temperature"),
    ("temperature huge", b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": 1e999}',
     400, "temperature"),
    ("top_p above 1", chat(top_p=1.5), 400, "top_p"),
    ("max_tokens zero", chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens a float", chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens a string", chat(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens beyond the context", chat(max_tokens=CONTEXT_LENGTH), 400, "max_tokens"),
    ("max_tokens huge", chat(max_tokens=10**30), 400, "max_tokens"),
    ("both token limits", chat(max_tokens=5, max_completion_tokens=6), 400, None),
    ("prompt beyond the context", chat(messages=[{"role": "user", "content": "x" * CONTEXT_LENGTH}]), 400,
     "messages"),
    ("n zero", chat(n=0), 400, "n"),
    ("n huge", chat(n=10**6), 400, "n"),
    ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop string", chat(stop=[""]), 400, "stop.0"),
    ("stop a number", chat(stop=5), 400, "stop"),
    ("seed a string", chat(seed="42"), 400, "seed"),
    ("seed beyond 64 bits", chat(seed=2**70), 400, "seed"),
    ("presence_penalty too low", chat(presence_penalty=-3), 400, "presence_penalty"),
    ("frequency_penalty too high", chat(frequency_penalty=3), 400, "frequency_penalty"),
    ("logit_bias key not an id", chat(logit_bias={"hello": 1}), 400, "logit_bias.hello.[key]"),
    ("logit_bias value too big", chat(logit_bias={"5": 1000}), 400, "logit_bias.5"),
    ("logit_bias id outside the vocabulary", chat(logit_bias={"99999": 1}), 400, "logit_bias"),
    ("logprobs a string", chat(logprobs="yes"), 400, "logprobs"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), 400, None),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("stream a string", chat(stream="true"), 400, "stream"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}), 400, None),
    ("stream_options unknown field", chat(stream=True, stream_options={"fast": True}), 400, "stream_options.fast"),
    ("top_k below -1", chat(top_k=-5), 400, "top_k"),
    ("min_p above 1", chat(min_p=2), 400, "min_p"),
    ("repetition_penalty zero", chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("user a number", chat(user=5), 400, "user"),
    ("tools to a model without tool support", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tools"),
    ("tool_choice without tools", chat(tool_choice="auto"), 400, "tool_choice"),
    ("unknown response_format", chat(response_format={"type": "xml"}), 400, "response_format"),
    ("response_format schema the grammar cannot enforce", chat(response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {"type": "string"}}}}), 400,
     "response_format"),
    ("unknown field", chat(temprature=0.5), 400, "temprature"),
    ("unknown model", chat(model="gpt-4o"), 404, "model"),
]


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
