"""Function calling: the parser and streaming scanner alone, then over HTTP on a tiny RANDOM-weight
checkpoint in v0.3's format (Mistral's real v3 tokenizer), where only the grammar can make a call valid."""

from dataclasses import replace
import json
import re

import jsonschema
import openai
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.api.tools import ToolCallScanner, ToolCalling, parse_tool_calls, tool_calls_token_id
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from mistral_serve.tool_call_ids import mistral_tool_call_id
from tests.api.conftest import MODEL_ID, serving, sse_events

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


def body(closers, **fields):
    return {"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS, "temperature": 1.0, "max_tokens": 120,
            "logit_bias": closers, **fields}


def check_calls(message, names):
    assert message["content"] is None
    for call in message["tool_calls"]:
        assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


NAMED = {"type": "function", "function": {"name": "get_weather"}}
SEEDS = [0, 1]  # n=10 per seed: 20 samples, streamed and not


@pytest.mark.parametrize("seed", SEEDS)
def test_a_named_function_is_called_with_valid_arguments(v3_client, closers, openai_schema, seed):
    reply = v3_client.post("/v1/chat/completions", json=body(closers, tool_choice=NAMED, n=10, seed=seed)).json()
    openai_schema("CreateChatCompletionResponse", reply)
    assert len(reply["choices"]) == 10
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(choice["message"]["tool_calls"]) == 1
        check_calls(choice["message"], {"get_weather"})
    ids = [c["message"]["tool_calls"][0]["id"] for c in reply["choices"]]
    assert len(set(ids)) == len(ids)  # fresh per call


@pytest.mark.parametrize("seed", SEEDS)
def test_a_named_function_is_called_with_valid_arguments_streamed(v3_client, closers, openai_schema, seed):
    request = body(closers, tool_choice=NAMED, n=10, seed=100 + seed, stream=True)
    events = sse_events(v3_client.post("/v1/chat/completions", json=request).text)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        openai_schema("CreateChatCompletionStreamResponse", event)
    for index in range(10):
        calls = reassembled(events[:-1], index)
        assert len(calls) == 1, calls
        assert CALL_ID.fullmatch(calls[0]["id"]) and calls[0]["name"] == "get_weather"
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
        reasons = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["index"] == index]
        assert [r for r in reasons if r] == ["tool_calls"]
        assert not "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"]
                           if c["index"] == index)


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


def reassembled(events, index=0):
    """The calls of choice `index`, put back together from its `delta.tool_calls` pieces."""
    calls = {}
    for event in events:
        for choice in event["choices"]:
            if choice["index"] != index:
                continue
            for delta_call in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta_call["index"], {"id": delta_call.get("id"), "name": None,
                                                              "arguments": ""})
                call["name"] = call["name"] or delta_call["function"].get("name")
                call["arguments"] += delta_call["function"].get("arguments") or ""
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


# a multi-turn conversation with calls and results, through the official openai client

FIRST_CALLS = [("call_abc123XYZ0987654321", "get_weather", '{"city": "Paris", "unit": "celsius", "days": 1}'),
               ("call_Zz9_second-one", "get-time", '{"zone": "CET"}')]
SECOND_CALL = ("call_0000000000000000000000000000third", "get_weather",
               '{"city": "Lyon", "unit": "fahrenheit", "days": 3}')


def openai_conversation() -> list[dict]:
    def call(call_id, name, arguments):
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [call(*c) for c in FIRST_CALLS]},
        {"role": "tool", "tool_call_id": FIRST_CALLS[0][0], "content": '{"temperature": 21}'},
        {"role": "tool", "tool_call_id": FIRST_CALLS[1][0], "content": "14:05"},
        {"role": "assistant", "content": "21 °C in Paris; it is 14:05 CET."},
        {"role": "user", "content": "And Lyon over three days?"},
        {"role": "assistant", "tool_calls": [call(*SECOND_CALL)]},
        {"role": "tool", "tool_call_id": SECOND_CALL[0], "content": '{"temperature": [70, 72, 68]}'},
    ]


def mistral_common_tokens(tokenizer) -> list[int]:
    """The same conversation built directly in mistral-common's types and encoded by it. OpenAI's
    ids are not valid Mistral ids (9 alphanumerics); the server maps each one the same way."""
    from mistral_common.protocol.instruct.messages import SystemMessage

    ids = {c[0]: mistral_tool_call_id(c[0]) for c in (*FIRST_CALLS, SECOND_CALL)}
    assert all(CALL_ID.fullmatch(i) for i in ids.values()) and len(set(ids.values())) == len(ids)

    def call(call_id, name, arguments):
        return ToolCall(id=ids[call_id], function=FunctionCall(name=name, arguments=arguments))
    request = MistralRequest(model="m", messages=[
        SystemMessage(content="You are terse."),
        UserMessage(content="Weather in Paris, and the time?"),
        AssistantMessage(content=None, tool_calls=[call(*c) for c in FIRST_CALLS]),
        ToolMessage(tool_call_id=ids[FIRST_CALLS[0][0]], content='{"temperature": 21}'),
        ToolMessage(tool_call_id=ids[FIRST_CALLS[1][0]], content="14:05"),
        AssistantMessage(content="21 °C in Paris; it is 14:05 CET."),
        UserMessage(content="And Lyon over three days?"),
        AssistantMessage(content=None, tool_calls=[call(*SECOND_CALL)]),
        ToolMessage(tool_call_id=ids[SECOND_CALL[0]], content='{"temperature": [70, 72, 68]}')],
        tools=[Tool(function=Function(name="get_weather", description="Weather", parameters=WEATHER)),
               Tool(function=Function(name="get-time", description="", parameters=TIME))])
    return tokenizer.mistral.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def v3_live_url(v3_engine, api_db, tmp_path_factory):
    with serving(create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(v3_engine)}, api_db)) as url:
        yield url


def test_a_multi_turn_conversation_through_the_openai_client_encodes_as_mistral_common_does(
        v3_live_url, v3_engine, api_key, monkeypatch):
    prompts = []  # what the engine was given, request by request
    add_request = v3_engine.add_request

    def recording(request_id, prompt_token_ids, params, *args, **kwargs):
        prompts.append(list(prompt_token_ids))
        return add_request(request_id, prompt_token_ids, params, *args, **kwargs)
    monkeypatch.setattr(v3_engine, "add_request", recording)

    reference = mistral_common_tokens(v3_engine.tokenizer)
    client = openai.OpenAI(base_url=v3_live_url + "/v1", api_key=api_key, max_retries=0)
    try:
        completion = client.chat.completions.create(model=MODEL_ID, messages=openai_conversation(), tools=TOOLS,
                                                    max_tokens=2, seed=0)
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=openai_conversation(), tools=TOOLS,
                                                     max_tokens=2, seed=0, stream=True,
                                                     stream_options={"include_usage": True}))
    finally:
        client.close()
    assert completion.usage.prompt_tokens == len(reference)
    assert chunks[-1].usage.prompt_tokens == len(reference)
    assert prompts == [reference, reference]


# malformed [TOOL_CALLS] output over HTTP: plain content, finish_reason "stop", never a 500

def scripted(engine, monkeypatch, pieces):
    """Make each choice's output `pieces` (text, token ids), whatever the model samples; ask for
    exactly len(pieces) tokens: the last piece, which the engine ends with "length", ends with "stop"."""
    step, seen = engine.step, {}

    def step_scripted():
        deltas = []
        for delta in step():
            key = (delta.request_id, delta.index)
            i = seen[key] = seen.get(key, -1) + 1
            text, token_ids = pieces[min(i, len(pieces) - 1)]
            last = delta.finish_reason is not None
            deltas.append(replace(delta, text=text, token_ids=token_ids, logprobs=None,
                                  finish_reason="stop" if last else delta.finish_reason))
        return deltas
    monkeypatch.setattr(engine, "step", step_scripted)


MALFORMED = {
    "cut short": ("", '[{"name": "get_weather", "argu', 'ments": {"city": "Pa'),
    "not json": ("", "oops, ", "no calls here"),
    "text before a broken call": ("Let me check. ", "", '[{"name": "nope", "arguments": }]'),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tool_calls_become_content_with_stop(v3_client, v3_engine, monkeypatch, case, stream):
    texts = MALFORMED[case]
    token = tool_calls_token_id(v3_engine.tokenizer)
    pieces = [(text, (token,) if i == texts.index("") else (1000 + i,)) for i, text in enumerate(texts)]
    scripted(v3_engine, monkeypatch, pieces)
    request = {"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto",
               "max_tokens": len(pieces), "seed": 0, "stream": stream,
               "logit_bias": {str(i): -100 for i in v3_engine.tokenizer.eos_token_ids}}
    response = v3_client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    if stream:
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        choices = [c for e in events[:-1] for c in e["choices"]]
        content = "".join(c["delta"].get("content") or "" for c in choices)
        reasons = [c["finish_reason"] for c in choices if c["finish_reason"]]
        # call pieces already streamed before the text turned out malformed stay sent (a stream
        # cannot take them back); the whole text still arrives as content, ending with "stop"
    else:
        message = response.json()["choices"][0]["message"]
        assert not message.get("tool_calls")
        content, reasons = message["content"], [response.json()["choices"][0]["finish_reason"]]
    assert content == "".join(texts)
    assert reasons == ["stop"]
