"""response_format over HTTP on a tiny RANDOM-weight v0.3-format checkpoint: only the grammar makes
the output valid JSON."""

import json

import jsonschema
import pytest

from tests.api.conftest import MODEL_ID, sse_events

SCHEMA = {"type": "object", "properties": {
    "answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 10},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}},
    "required": ["answer", "score", "tags"]}
VERDICT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


def ask(client, closers, response_format, **fields):
    return client.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Answer in JSON."}], "temperature": 1.0,
        "max_tokens": 120, "logit_bias": closers, "response_format": response_format, **fields})


@pytest.mark.parametrize("seed", [0, 1])  # n=10 per seed: 20 samples
def test_json_object_is_one_object_20_times_out_of_20(v3_client, closers, openai_schema, seed):
    reply = ask(v3_client, closers, {"type": "json_object"}, n=10, seed=seed).json()
    openai_schema("CreateChatCompletionResponse", reply)
    assert len(reply["choices"]) == 10
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"]), dict), choice


@pytest.mark.parametrize("seed", [10, 11])  # n=10 per seed: 20 samples
def test_json_schema_validates_20_times_out_of_20(v3_client, closers, openai_schema, seed):
    reply = ask(v3_client, closers, VERDICT, n=10, seed=seed).json()
    openai_schema("CreateChatCompletionResponse", reply)
    assert len(reply["choices"]) == 10
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_schema_validates_streamed_too(v3_client, closers, openai_schema):
    events = sse_events(ask(v3_client, closers, VERDICT, n=4, seed=2, stream=True).text)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        openai_schema("CreateChatCompletionStreamResponse", event)
    for index in range(4):
        text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"]
                       if c["index"] == index)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_an_unsupported_schema_keyword_is_named(v3_client, closers):
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}
    error = ask(v3_client, closers, response_format).json()["error"]
    assert error["param"] == "response_format" and "uniqueItems" in error["message"]


def test_text_is_unconstrained(v3_client, closers):
    assert ask(v3_client, {}, {"type": "text"}, max_tokens=3).status_code == 200
