"""Conversations OpenAI accepts, over HTTP on the tiny checkpoint in v0.3's format (Mistral's real v3
tokenizer): system and developer messages after the first turn, names, a tool call with empty
content. The prompt the engine gets is mistral-common's for the same content."""

from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage, ToolMessage,
                                                       UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_serve.tool_call_ids import mistral_tool_call_id
from tests.api.conftest import MODEL_ID
from tests.api.servers import V3_TOKENIZER

CALL_ID = "call_abc123XYZ0987654321"
ARGUMENTS = '{"city": "Paris"}'
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}]

# what an agent library sends when it asks the model to try again
AGENT_CONVERSATION = [
    {"role": "system", "content": "You report the weather."},
    {"role": "user", "content": "Weather in Paris?", "name": "ann"},
    {"role": "assistant", "content": "", "name": "bot", "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "22 degrees"},
    {"role": "assistant", "content": "It is warm."},
    {"role": "developer", "content": "Give the temperature in degrees."},
    {"role": "user", "content": "So, how warm?"},
]


def reference_prompt() -> list[int]:
    """The same content built in mistral-common's types, every system message first (where its
    normalizer joins them into v3's one system prompt anyway), encoded by mistral-common alone."""
    call_id = mistral_tool_call_id(CALL_ID)
    request = MistralRequest(model="m", messages=[
        SystemMessage(content="You report the weather."), SystemMessage(content="Give the temperature in degrees."),
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(tool_calls=[ToolCall(id=call_id, function=FunctionCall(name="get_weather",
                                                                                  arguments=ARGUMENTS))]),
        ToolMessage(tool_call_id=call_id, content="22 degrees"),
        AssistantMessage(content="It is warm."),
        UserMessage(content="So, how warm?")],
        tools=[Tool(function=Function(name="get_weather", description="Weather", parameters=WEATHER))])
    return MistralTokenizer.from_file(str(V3_TOKENIZER)).encode_chat_completion(request).tokens


def test_a_late_system_message_is_answered_with_mistral_commons_prompt(v3_client, v3_engine, monkeypatch):
    prompts = []  # what the engine was given
    add_request = v3_engine.add_request

    def recording(request_id, prompt_token_ids, params, *args, **kwargs):
        prompts.append(list(prompt_token_ids))
        return add_request(request_id, prompt_token_ids, params, *args, **kwargs)
    monkeypatch.setattr(v3_engine, "add_request", recording)

    reply = v3_client.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": AGENT_CONVERSATION, "tools": TOOLS, "max_tokens": 2, "seed": 0})
    assert reply.status_code == 200, reply.text
    reference = reference_prompt()
    assert prompts == [reference]
    assert reply.json()["usage"]["prompt_tokens"] == len(reference)


def test_a_conversation_left_on_the_assistants_turn_is_a_400_that_says_so(v3_client):
    messages = [*AGENT_CONVERSATION[:-1], {"role": "system", "content": "Try again."}]
    reply = v3_client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": messages, "max_tokens": 2})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "messages"
    assert "system messages aside, must be from the user or a tool, not the assistant" in error["message"]
