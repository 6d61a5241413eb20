"""Function calling: the parser and streaming scanner alone, then over HTTP on a tiny RANDOM-weight
checkpoint in v0.3's format (Mistral's real v3 tokenizer), where only the grammar can make a call valid."""

import json
import re
import shutil

from fastapi.testclient import TestClient
import jsonschema
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.api.tools import ToolCallScanner, ToolCalling, parse_tool_calls
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.builder import load_engine
from mistral_serve.engine.engine import EngineConfig
from mistral_serve.settings import Settings
from mistral_serve.tokenizer import mistral_tool_call_id
from tests.api.conftest import MODEL_ID, bearer, sse_events
from tests.api.servers import V3_TOKENIZER
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit", "days"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get-time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get-time": TIME}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")


# the whole output, parsed once

@pytest.mark.parametrize("text, expected", [
    ('[{"name": "f", "arguments": {"a": 1}}]', [("f", {"a": 1})]),
    ('[{"name":"f","arguments":{}},{"name":"g","arguments":{"b":"x"}}]', [("f", {}), ("g", {"b": "x"})]),
    ('[{"name": "f", "arguments": {"a": 1}', None),  # cut short
    ('Sure! [{"name": "f", "arguments": {}}]', None),  # text is not a call
    ('[{"arguments": {}}]', None), ('[]', None), ('{"name": "f", "arguments": {}}', None),
    ('[{"name": "f", "arguments": "{}"}]', None),
])
def test_parse_tool_calls(text, expected):
    calls = parse_tool_calls(text)
    if expected is None:
        assert calls is None
    else:
        assert [(call["name"], json.loads(call["arguments"])) for call in calls] == expected


def scan(text, pieces, **kwargs):
    """The calls a scanner reassembles from `text` fed in pieces of `pieces` characters."""
    scanner, calls = ToolCallScanner(**kwargs), {}
    for start in range(0, len(text), pieces):
        for delta in scanner.feed(text[start:start + pieces]):
            if delta.index not in calls:
                assert delta.id and CALL_ID.fullmatch(delta.id) and delta.name
                calls[delta.index] = [delta.name, ""]
            else:
                assert delta.id is None and delta.name is None
            calls[delta.index][1] += delta.arguments
    return [(name, json.loads(arguments)) for name, arguments in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_the_scanner_streams_arguments_exactly_as_written(pieces):
    text = ('[{"name": "f", "arguments": {"q": "a \\"}]\\" b", "n": [1, {"x": 2}]}}, '
            '{"arguments": 5, "name": "g"}, {"name": "h", "arguments": "s,}"}]')
    assert scan(text, pieces) == [("f", {"q": 'a "}]" b', "n": [1, {"x": 2}]}), ("g", 5), ("h", "s,}")]
    assert scan(text, pieces, max_num_calls=1) == [("f", {"q": 'a "}]" b', "n": [1, {"x": 2}]})]


TOKEN = 5  # stands for [TOOL_CALLS]


def test_auto_reads_text_then_calls_and_malformed_calls_become_content():
    reader = ToolCalling(TOKEN, is_forced=False, max_num_calls=None).reader()
    assert reader.on_delta("Let me check.", (1,)) == ("Let me check.", [])
    content, calls = reader.on_delta('[{"name": "f", "arguments": {"a": 1}}]', (TOKEN, 2))
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
    assert reader.finish("stop") == ("", "tool_calls")
    broken = ToolCalling(TOKEN, is_forced=False, max_num_calls=None).reader()
    broken.on_delta('[{"name": "f", "argu', (TOKEN, 2))
    assert broken.finish("stop") == ('[{"name": "f", "argu', "stop")
    assert broken.finish("length")[1] == "length"
    plain = ToolCalling(TOKEN, is_forced=False, max_num_calls=None).reader()
    assert plain.on_delta("[1]", (3,)) == ("[1]", []) and plain.finish("stop") == ("", "stop")


# over HTTP, on a random v0.3-format checkpoint

@pytest.fixture(scope="module")
def v3_engine(tmp_path_factory):
    config = tiny_mistral_config(vocab_size=32768, max_position_embeddings=1024)
    path, _ = write_hf_checkpoint(tmp_path_factory.mktemp("v3"), config)
    shutil.copy(V3_TOKENIZER, path / "tokenizer.model.v3")
    return load_engine(str(path), config=EngineConfig(block_size=16, num_kv_blocks=256, max_num_seqs=16))


@pytest.fixture(scope="module")
def v3_client(v3_engine, api_db, api_key):
    with TestClient(create_app(Settings(), {MODEL_ID: AsyncEngine(v3_engine)}, api_db),
                    headers=bearer(api_key)) as client:
        yield client


@pytest.fixture(scope="module")
def closers(v3_engine):
    """logit_bias that makes a random model likely to close strings and objects; only the grammar
    makes the output valid."""
    vocab = v3_engine.tokenizer.grammar_vocab()
    bias = {b'"': 10.0, b"}": 4.0, b"]": 4.0}
    return {str(i): bias[piece] for i, piece in enumerate(vocab) if piece in bias}


def body(closers, **fields):
    return {"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS, "temperature": 1.0, "max_tokens": 120,
            "logit_bias": closers, **fields}


def check_calls(message, names):
    assert message["content"] is None
    for call in message["tool_calls"]:
        assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("seed", [0, 1])
def test_a_named_function_is_called_with_valid_arguments(v3_client, closers, openai_schema, seed):
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = v3_client.post("/v1/chat/completions", json=body(closers, tool_choice=named, n=5, seed=seed)).json()
    openai_schema("CreateChatCompletionResponse", reply)
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(choice["message"]["tool_calls"]) == 1
        check_calls(choice["message"], {"get_weather"})
    ids = [c["message"]["tool_calls"][0]["id"] for c in reply["choices"]]
    assert len(set(ids)) == len(ids)  # fresh per call


@pytest.mark.parametrize("choice", ["required", "any"])
def test_required_calls_any_offered_function(v3_client, closers, openai_schema, choice):
    reply = v3_client.post("/v1/chat/completions", json=body(closers, tool_choice=choice, n=4, seed=3,
                                                             max_tokens=250)).json()
    openai_schema("CreateChatCompletionResponse", reply)
    for item in reply["choices"]:
        assert item["finish_reason"] == "tool_calls", item
        assert item["message"]["tool_calls"]
        check_calls(item["message"], set(SCHEMAS))


def test_without_parallel_calls_there_is_one_call(v3_client, closers):
    reply = v3_client.post("/v1/chat/completions", json=body(closers, tool_choice="required", n=4, seed=5,
                                                             parallel_tool_calls=False)).json()
    for item in reply["choices"]:
        assert item["finish_reason"] == "tool_calls" and len(item["message"]["tool_calls"]) == 1


def reassembled(events):
    calls = {}
    for event in events:
        for delta_call in event["choices"][0]["delta"].get("tool_calls", []) if event["choices"] else []:
            call = calls.setdefault(delta_call["index"], {"id": delta_call.get("id"), "name": None, "arguments": ""})
            call["name"] = call["name"] or delta_call["function"].get("name")
            call["arguments"] += delta_call["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def test_streamed_calls_reassemble_to_the_non_streamed_ones(v3_client, closers, openai_schema):
    request = body(closers, tool_choice="required", seed=11, max_tokens=250)
    plain = v3_client.post("/v1/chat/completions", json=request).json()["choices"][0]
    events = sse_events(v3_client.post("/v1/chat/completions", json={**request, "stream": True}).text)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        openai_schema("CreateChatCompletionStreamResponse", event)
    streamed = reassembled(events[:-1])
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in plain["message"]["tool_calls"]]
    assert all(CALL_ID.fullmatch(c["id"]) for c in streamed)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "tool_calls"


def test_auto_and_none_answer_without_constraint(v3_client, openai_schema):
    for choice in ("auto", "none"):
        reply = v3_client.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "max_tokens": 8,
            "seed": 1}).json()
        openai_schema("CreateChatCompletionResponse", reply)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_a_conversation_with_openai_call_ids_encodes_as_mistral_common_does(v3_client, v3_engine):
    call_id = "call_abc123XYZ0987654321"
    arguments = '{"city": "Paris", "unit": "celsius", "days": 1}'
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21}'},
                {"role": "user", "content": "And tomorrow?"}]
    reply = v3_client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": messages, "tools": TOOLS,
                                                         "max_tokens": 4, "seed": 0})
    assert reply.status_code == 200, reply.text
    mistral_id = mistral_tool_call_id(call_id)
    reference = v3_engine.tokenizer.mistral.encode_chat_completion(MistralRequest(model="m", messages=[
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(content=None, tool_calls=[ToolCall(id=mistral_id, function=FunctionCall(
            name="get_weather", arguments=arguments))]),
        ToolMessage(tool_call_id=mistral_id, content='{"temperature": 21}'),
        UserMessage(content="And tomorrow?")],
        tools=[Tool(function=Function(name=t["function"]["name"], description=t["function"].get("description", ""),
                                      parameters=t["function"]["parameters"])) for t in TOOLS])).tokens
    assert reply.json()["usage"]["prompt_tokens"] == len(reference)
    assert v3_engine.tokenizer.encode_chat(messages, tools=TOOLS) == reference


def test_the_catalog_says_which_models_take_tools(v3_client, client):
    for http, takes_tools in ((v3_client, True), (client, False)):
        model = http.get(f"/v1/models/{MODEL_ID}").json()
        assert model["capabilities"]["tools"] is takes_tools
        assert model["capabilities"]["json_mode"] and model["capabilities"]["json_schema"]
        validator = jsonschema.Draft202012Validator(model["json_request_schema"])
        assert validator.is_valid({"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS}) is takes_tools


def test_tool_errors_are_400s_naming_the_field(v3_client, client):
    refused = client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
    cases = [({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
             ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                 "type": "object", "properties": {"a": {"not": {}}}}}}], "tool_choice": "required"}, "tools")]
    for fields, param in cases:
        response = v3_client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES, **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
