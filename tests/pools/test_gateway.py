"""Two `mistral-serve engine` processes behind one `mistral-serve serve` gateway answer as the engine
in the gateway's own process does, on the same checkpoint and seed: plain and streamed, through the
provider examples and the official openai client, with tools and JSON schemas; usage and limits are
the gateway's."""

from __future__ import annotations

from contextlib import ExitStack
import json
from pathlib import Path

import httpx
from openai import OpenAI
import pytest

from tests.api.conftest import bearer, sse_events
from tests.api.servers import TINY_CONTEXT_LENGTH, V3_MODEL_ID, create_key, mistral_serve
from tests.api.examples import OPENAI_STYLE, OXEN_MODEL, OXEN_STYLE, OXEN_STYLE_STREAM, run_example
from tests.pools.cluster import ENGINE_TOKEN, TOKEN_VARIABLE, engines, upstream_flags
from tests.services import ServiceUnavailable
from tests.upstream.smg import smg_router

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello there"}]

# the same request to both servers: what must come back the same
REQUESTS = {
    "seeded sampling": {"seed": 7, "temperature": 1.0, "max_tokens": 12},
    "greedy, two choices": {"temperature": 0, "max_tokens": 8, "n": 2},
    "stop string and logprobs": {"seed": 3, "max_tokens": 10, "stop": ["e"], "logprobs": True, "top_logprobs": 2},
    "forced tool call": {"seed": 5, "max_tokens": 60, "tools": TOOLS, "tool_choice": "required"},
    "json schema": {"seed": 11, "max_tokens": 60, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}},
}


@pytest.fixture(scope="module")
def pool_engines(tmp_path_factory, tiny_v3):
    with engines(tmp_path_factory.mktemp("engines"), tiny_v3, 2) as started:
        yield started


@pytest.fixture(scope="module", params=["direct", "through smg"])
def gateway(request, tmp_path_factory, pool_engines):
    """The gateway, its pool of the two engines, or of smg in front of them (smg's one upstream)."""
    work = tmp_path_factory.mktemp("gateway")
    with ExitStack() as stack:
        if request.param == "direct":
            flags = upstream_flags(pool_engines)
        else:
            try:
                router = stack.enter_context(smg_router([engine.origin for engine in pool_engines],
                                                        worker_token=ENGINE_TOKEN, log_path=work / "smg.log"))
            except ServiceUnavailable as error:
                pytest.skip(str(error))
            pools = work / "pools.yaml"  # JSON is YAML; smg does not say the engines' context length: we do
            pools.write_text(json.dumps({"models": [{"id": V3_MODEL_ID, "max_model_len": TINY_CONTEXT_LENGTH,
                                                     "upstreams": [{"url": router, "name": "smg", "token_env": TOKEN_VARIABLE,
                                                                    "health_path": "/readiness"}]}]}))
            flags = ["--pools-file", str(pools)]
        yield stack.enter_context(mistral_serve(work, *flags))


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_v3):
    with mistral_serve(tmp_path_factory.mktemp("in-process"), "--model", f"{V3_MODEL_ID}={tiny_v3}",
                       "--kv-cache-memory-mb", "64") as server:
        yield server


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=bearer(server.key), timeout=120)


def without_ids(reply: dict) -> dict:
    """A reply's choices and token counts: what the model and the metering decided. Ids and times
    differ, and so do cached tokens: they tell which engine had seen the prompt before."""
    choices = json.loads(json.dumps(reply["choices"]))
    for choice in choices:
        for call in choice["message"].get("tool_calls") or ():
            call.pop("id")
    usage = {key: value for key, value in reply["usage"].items() if key != "prompt_tokens_details"}
    assert 0 <= reply["usage"]["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    return {"choices": choices, "usage": usage}


def streamed(server, body: dict) -> tuple[dict, list[dict]]:
    """A streamed reply gathered: per choice its text, calls and finish_reason, the usage; and the chunks."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=bearer(server.key),
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = {key: value for key, value in chunks[-1]["usage"].items() if key != "prompt_tokens_details"}
    gathered: dict = {"choices": {}, "usage": usage}
    for chunk in chunks:
        assert chunk["id"] == chunks[0]["id"] and chunk["model"] == body["model"]
        for choice in chunk["choices"]:
            entry = gathered["choices"].setdefault(choice["index"], {"text": "", "calls": [], "finish_reason": None})
            entry["text"] += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls") or ():
                entry["calls"].append({key: value for key, value in call.items() if key != "id"})
            entry["finish_reason"] = choice["finish_reason"] or entry["finish_reason"]
    return gathered, chunks


@pytest.mark.parametrize("name", REQUESTS)
def test_a_pooled_model_answers_as_the_engine_in_process_does(gateway, in_process, name):
    body = {"model": V3_MODEL_ID, "messages": MESSAGES, **REQUESTS[name]}
    pooled, local = post(gateway, body), post(in_process, body)
    assert pooled.status_code == local.status_code == 200, (pooled.text, local.text)
    assert pooled.json()["id"] == pooled.headers["x-request-id"]
    assert without_ids(pooled.json()) == without_ids(local.json())
    pooled_stream, chunks = streamed(gateway, body)
    assert streamed(in_process, body)[0] == pooled_stream
    assert all("usage" in chunk for chunk in chunks)  # asked for: null until the last


def test_the_usage_chunk_comes_only_when_asked_for(gateway):
    body = {"model": V3_MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=bearer(gateway.key), timeout=120)
    *chunks, done = sse_events(response.text)
    assert done == "[DONE]" and chunks
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)


def test_the_provider_examples_run_verbatim_through_the_pool(gateway, in_process, openai_schema):
    for example in (OPENAI_STYLE, OXEN_STYLE):
        pooled = eval(run_example(example, gateway.url, gateway.key))  # the example prints r.json()
        openai_schema("CreateChatCompletionResponse", pooled)
        local = eval(run_example(example, in_process.url, in_process.key))
        # no seed in the examples: the text, its length and how it ended may differ; the prompt may not
        usage = pooled["usage"]
        assert usage["prompt_tokens"] == local["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] <= TINY_CONTEXT_LENGTH
        assert pooled["choices"][0]["finish_reason"] in ("stop", "length")
    lines = run_example(OXEN_STYLE_STREAM, gateway.url, gateway.key).splitlines()
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    model = eval(run_example(OXEN_MODEL, gateway.url, gateway.key))
    assert model["id"] == "open-mistral-7b" and model["backend"] is None
    assert model["pool"]["policy"] == "prefix_affinity"
    names = [member["name"] for member in model["pool"]["upstreams"]]
    assert names == (["smg"] if names == ["smg"] else ["engine0", "engine1"])
    assert model["context_length"] == 512  # what the engines serve, learnt from them


def test_the_openai_client_gets_the_same_answers(gateway, in_process):
    replies = []
    for server in (gateway, in_process):
        client = OpenAI(base_url=server.url + "/v1", api_key=server.key)
        plain = client.chat.completions.create(model=V3_MODEL_ID, messages=MESSAGES, seed=21, max_tokens=10)
        stream = client.chat.completions.create(model=V3_MODEL_ID, messages=MESSAGES, seed=21, max_tokens=10,
                                                stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        tool = client.chat.completions.create(model=V3_MODEL_ID, messages=MESSAGES, seed=2, max_tokens=60,
                                              tools=TOOLS, tool_choice={"type": "function",
                                                                        "function": {"name": "get_weather"}})
        [call] = tool.choices[0].message.tool_calls
        replies.append((plain.choices[0].message.content, plain.usage.completion_tokens, text,
                        call.function.name, json.loads(call.function.arguments), tool.choices[0].finish_reason))
    assert replies[0] == replies[1]
    assert replies[0][2] == replies[0][0]  # streamed as answered


def test_the_gateway_keeps_the_keys_and_the_engines_keep_their_token(gateway, pool_engines):
    body = {"model": V3_MODEL_ID, "messages": MESSAGES, "max_tokens": 2}
    refused = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=bearer(ENGINE_TOKEN), timeout=30)
    assert refused.status_code == 401  # the engines' token is no key of the gateway
    direct = httpx.post(pool_engines[0].base_url + "/chat/completions", json=body, headers=bearer(gateway.key),
                        timeout=30)
    assert direct.status_code == 401 and direct.json()["error"]["code"] == "invalid_api_key"


def test_bad_requests_are_refused_by_the_gateway_before_they_travel(gateway, pool_engines):
    before = [engine.metric("mistral_serve_requests_total") for engine in pool_engines]
    too_long = {"model": V3_MODEL_ID, "messages": MESSAGES, "max_tokens": 10_000}
    response = post(gateway, too_long)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    huge_enum = {"type": "string", "enum": [f"v{index}" for index in range(5000)]}
    response = post(gateway, {"model": V3_MODEL_ID, "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": huge_enum}}})
    assert response.status_code == 400 and response.json()["error"]["code"] == "grammar_too_large"
    assert [engine.metric("mistral_serve_requests_total") for engine in pool_engines] == before


def test_a_key_over_its_limit_is_refused_before_anything_travels(gateway, pool_engines):
    data_dir = Path(gateway.process.args[gateway.process.args.index("--data-dir") + 1])
    small = create_key(data_dir, None, "--tpm", "50", email="small@example.com", name="small")
    before = [engine.metric("mistral_serve_requests_total") for engine in pool_engines]
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(small), timeout=60,
                          json={"model": V3_MODEL_ID, "messages": MESSAGES, "max_tokens": 200})
    assert response.status_code == 429, response.text
    assert "x-ratelimit-limit-tokens" in response.headers
    assert [engine.metric("mistral_serve_requests_total") for engine in pool_engines] == before
