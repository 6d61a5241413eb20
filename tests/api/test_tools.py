"""Function calling: the streaming scanner and a choice's reader alone, then over HTTP on a tiny RANDOM-weight
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

from mistral_serve.api.tools import ToolCallScanner, ToolCalling, tool_calls_schema, tool_calls_token_id
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


def read(text_pieces, finish_reason, *, is_forced=False, max_num_calls=None):
    """(content, calls as (name, arguments text), finish_reason) that a reader makes of one choice's
    output: each piece is (text, token ids), TOKEN standing for [TOOL_CALLS]."""
    reader = ToolCalling(TOKEN, is_forced=is_forced, max_num_calls=max_num_calls).reader()
    content, calls = "", {}
    for text, token_ids in text_pieces:
        more, deltas = reader.on_delta(text, token_ids)
        content += more
        for delta in deltas:
            name, arguments = calls.get(delta.index, (delta.name, ""))
            calls[delta.index] = (name, arguments + delta.arguments)
    rest, finish_reason = reader.finish(finish_reason)
    return content + rest, [calls[i] for i in sorted(calls)], finish_reason


CALL = '{"name": "f", "arguments": {"a": 1}}'


@pytest.mark.parametrize("output, finish, expected", [
    # text, then whole calls
    ([("Let me check.", (1,)), (f"[{CALL}]", (TOKEN, 2))], "stop", ("Let me check.", [("f", '{"a": 1}')], "tool_calls")),
    # whole calls cut just before the end of the array are whole all the same
    ([("", (TOKEN,)), (f"[{CALL}, {CALL}", (2,))], "length", ("", [("f", '{"a": 1}')] * 2, "tool_calls")),
    # a call cut by max_tokens: the whole ones before it stay, the cut one keeps what was generated
    ([("", (TOKEN,)), (f'[{CALL}, {{"name": "g", "arguments": {{"b": "x', (2,))], "length",
     ("", [("f", '{"a": 1}'), ("g", '{"b": "x')], "length")),
    # cut before its name: nothing of it was sent, nothing of it becomes content
    ([("", (TOKEN,)), (f'[{CALL}, {{"na', (2,))], "length", ("", [("f", '{"a": 1}')], "length")),
    ([("", (TOKEN,)), ('[{"name": "get_we', (2,))], "length", ("", [], "length")),
    # the model ends a call it has not closed: the call stays as sent
    ([("", (TOKEN,)), ('[{"name": "f", "argu', (2,)), ('ments": {"a": ', (3,))], "stop", ("", [("f", '{"a": ')], "stop")),
    # arguments that are not an object are not a whole call
    ([("", (TOKEN,)), ('[{"name": "f", "arguments": 5}]', (2,))], "stop", ("", [("f", "5")], "stop")),
    # after [TOOL_CALLS], text in which no call begins is not a call: it is content
    ([("", (TOKEN,)), ("oops, no calls here", (2,))], "stop", ("oops, no calls here", [], "stop")),
    # no [TOOL_CALLS]: text, even if it looks like calls
    ([(f"[{CALL}]", (3,))], "stop", (f"[{CALL}]", [], "stop")),
])
def test_a_choice_keeps_every_call_it_sent_and_never_sends_text_twice(output, finish, expected):
    assert read(output, finish) == expected


def test_without_parallel_calls_the_first_whole_call_is_the_answer():
    output = [(f"[{CALL}, ", (TOKEN,)), ('{"name": "g", "arguments": {"b', (2,))]
    assert read(output, "length", max_num_calls=1) == ("", [("f", '{"a": 1}')], "tool_calls")
    assert read(output, "length") == ("", [("f", '{"a": 1}'), ("g", '{"b')], "length")


def test_a_forced_choice_reads_calls_from_the_start():
    assert read([(f"[{CALL}]", (2,))], "stop", is_forced=True) == ("", [("f", '{"a": 1}')], "tool_calls")
    assert read([('[{"name": "f", "arg', (2,))], "length", is_forced=True) == ("", [("f", "")], "length")


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
def v3_live_url(v3_client):
    # v3_client's app itself: a second AsyncEngine would drive the same engine from a second thread
    with serving(v3_client.app, is_started=True) as url:
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


# unfinished or malformed [TOOL_CALLS] output over HTTP: what was sent as calls stays calls

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


MALFORMED = {  # the pieces, then (content, calls as (name, arguments text))
    "cut short": (("", '[{"name": "get_weather", "argu', 'ments": {"city": "Pa'),
                  (None, [("get_weather", '{"city": "Pa')])),
    "not json": (("", "oops, ", "no calls here"), ("oops, no calls here", [])),
    "text before a broken call": (("Let me check. ", "", '[{"name": "nope", "arguments": }]'),
                                  ("Let me check. ", [("nope", "")])),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tool_calls_are_sent_once_and_end_with_stop(v3_client, v3_engine, monkeypatch, case, stream):
    texts, (expected_content, expected_calls) = MALFORMED[case]
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
        content = "".join(c["delta"].get("content") or "" for c in choices) or None
        calls = [(c["name"], c["arguments"]) for c in reassembled(events[:-1])]
        reasons = [c["finish_reason"] for c in choices if c["finish_reason"]]
    else:
        choice = response.json()["choices"][0]
        content, reasons = choice["message"]["content"], [choice["finish_reason"]]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls", [])]
    assert (content, calls) == (expected_content, expected_calls)
    assert reasons == ["stop"]


# schemas as libraries send them: references, recursion, unions

ADDRESS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "zip": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}},
           "required": ["city", "zip"]}
TRIP = {  # a Pydantic model with a sub-model, a recursive list and a union of objects, as model_json_schema() writes it
    "$defs": {"Address": ADDRESS,
              "Stop": {"type": "object", "properties": {"at": {"$ref": "#/$defs/Address"},
                                                        "then": {"type": "array", "items": {"$ref": "#/$defs/Stop"},
                                                                 "maxItems": 1}},
                       "required": ["at", "then"]},
              "Car": {"type": "object", "properties": {"kind": {"const": "car"}, "seats": {"type": "integer"}},
                      "required": ["kind", "seats"]},
              "Train": {"type": "object", "properties": {"kind": {"const": "train"}}, "required": ["kind"]}},
    "type": "object",
    "properties": {"start": {"$ref": "#/$defs/Address"}, "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"},
                                                                   "maxItems": 2},
                   "by": {"oneOf": [{"$ref": "#/$defs/Car"}, {"$ref": "#/$defs/Train"}]},
                   "mood": {"enum": ["calm", 3, True, None]}},
    "required": ["start", "stops", "by", "mood"]}
OLD_STYLE = {"definitions": {"Unit": {"enum": ["celsius", "fahrenheit"]}}, "type": "object",
             "properties": {"unit": {"$ref": "#/definitions/Unit"}, "more": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
             "required": ["unit", "more"]}
NESTED_TOOLS = [{"type": "function", "function": {"name": "plan_trip", "parameters": TRIP}},
                {"type": "function", "function": {"name": "convert", "parameters": OLD_STYLE}}]
NESTED_SCHEMAS = {"plan_trip": TRIP, "convert": OLD_STYLE}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "plan_trip"}},
                                         {"type": "function", "function": {"name": "convert"}}],
                         ids=["required", "named", "named-recursive"])
def test_forced_calls_take_schemas_with_references(v3_client, closers, tool_choice):
    response = v3_client.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": MESSAGES, "tools": NESTED_TOOLS, "tool_choice": tool_choice, "n": 4,
        "seed": 7, "temperature": 1.0, "max_tokens": 400, "logit_bias": closers})
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        if choice["finish_reason"] == "length":
            continue  # a random model may wander until cut: the cut call is checked elsewhere
        assert choice["finish_reason"] == "tool_calls", choice
        for call in choice["message"]["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), NESTED_SCHEMAS[call["function"]["name"]])


def test_the_forced_call_grammar_moves_references_with_the_parameters():
    schema = tool_calls_schema([{"name": "f", "parameters": OLD_STYLE}, {"name": "g", "parameters": TRIP}],
                               max_num_calls=None)
    calls = [{"name": "f", "arguments": {"unit": "celsius", "more": {"unit": "fahrenheit", "more": None}}},
             {"name": "g", "arguments": {"start": {"city": "Paris", "zip": None}, "stops": [], "by": {"kind": "train"},
                                         "mood": None}}]
    jsonschema.validate(calls, schema)  # the references resolve in the array's schema as in each function's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "arguments": {"unit": "kelvin", "more": None}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "arguments": {"unit": "celsius", "more": {"unit": 1, "more": None}}}], schema)
    # a property named like a keyword is still a schema; data under const and enum is left alone
    odd = {"type": "object", "properties": {"const": {"$ref": "#/$defs/X"}, "k": {"const": {"$ref": "#/x"}}},
           "$defs": {"X": {"type": "integer"}}}
    moved = tool_calls_schema([{"name": "f", "parameters": odd}], max_num_calls=1)["$defs"]["call_0"]
    assert moved["properties"] == {"const": {"$ref": "#/$defs/call_0/$defs/X"}, "k": {"const": {"$ref": "#/x"}}}


# a call cut by max_tokens

@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_call_cut_by_max_tokens_stays_a_call(v3_client, closers, stream):
    """Forced calls cut at every length from the first token on: never content, the same calls
    streamed or not, and finish_reason "length" unless every call sent is whole."""
    for max_tokens in (3, 12, 24):
        request = body(closers, tool_choice="required", n=3, seed=max_tokens, max_tokens=max_tokens, stream=stream)
        response = v3_client.post("/v1/chat/completions", json=request)
        assert response.status_code == 200, response.text
        for index in range(3):
            if stream:
                events = sse_events(response.text)[:-1]
                choices = [c for e in events for c in e["choices"] if c["index"] == index]
                content = "".join(c["delta"].get("content") or "" for c in choices) or None
                calls = reassembled(events, index)
                finish_reason = [c["finish_reason"] for c in choices if c["finish_reason"]][-1]
            else:
                choice = response.json()["choices"][index]
                content, finish_reason = choice["message"]["content"], choice["finish_reason"]
                calls = [{"id": c["id"], **c["function"]} for c in choice["message"].get("tool_calls", [])]
            assert not content, (max_tokens, content)
            assert all(call["name"] in SCHEMAS and CALL_ID.fullmatch(call["id"]) for call in calls)
            whole = [call for call in calls[:-1]] if finish_reason == "length" else calls
            for call in whole:
                jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
            assert finish_reason in ("length", "tool_calls")


# RFC 8259: control characters in strings only as escapes

@pytest.mark.parametrize("field", ["tools", "response_format"])
def test_strings_under_a_grammar_never_hold_raw_control_characters(v3_client, v3_engine, closers, field):
    """A bias toward the byte-fallback tokens of U+0001-U+001F makes a random model pick them
    wherever it may; strings with a length bound (WEATHER's city) let them through raw before."""
    vocab = v3_engine.tokenizer.grammar_vocab()
    control = {str(i): 8.0 for i, piece in enumerate(vocab) if len(piece) == 1 and 0 < piece[0] < 0x20}
    assert len(control) >= 31  # the 31 byte-fallback tokens, and pieces that are such a character
    fields = ({"tool_choice": "required"} if field == "tools" else
              {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}})
    reply = v3_client.post("/v1/chat/completions", json={**body({**closers, **control}, n=6, seed=109, max_tokens=200),
                                                        **fields}).json()
    for choice in reply["choices"]:
        if choice["finish_reason"] == "length":
            continue
        if field == "tools":
            outputs = [(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])
                       for call in choice["message"]["tool_calls"]]
            assert outputs, choice
        else:
            outputs = [(choice["message"]["content"], WEATHER)]
        for text, schema in outputs:
            jsonschema.validate(json.loads(text), schema)  # json.loads refuses raw control characters
