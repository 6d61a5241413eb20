"""The openai package's own helpers for Pydantic models: `pydantic_function_tool`, and
`chat.completions.parse` and `.stream`, which turn the answer back into the models; a tool conversation
with nested parameters, forced and automatic, round-trips through them."""

import openai
import pytest

from tests.clients.helpers import MAX_TOKENS, MODEL_ID, Trip

PLAN = [{"role": "user", "content": "Plan a trip to Rome."}]
TRIP_TOOL = openai.pydantic_function_tool(Trip)
FORCED = {"required": "required", "named": {"type": "function", "function": {"name": "Trip"}}}
EOS_TOKEN_ID = 2  # Mistral's v3 tokenizer
ENDS_SOONER = {str(EOS_TOKEN_ID): 5.0}  # the random model would ramble on to max_tokens; nudged, it stops


@pytest.fixture
def client(server, base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=server.key)


def parse(client: openai.OpenAI, messages: list, **fields):
    return client.chat.completions.parse(model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         **fields)


def reply_to(message) -> list[dict]:
    """What the user sends after `message`: a result for each of its tool calls, else a new question."""
    if message.tool_calls:
        return [{"role": "tool", "tool_call_id": call.id, "content": "Booked."} for call in message.tool_calls]
    return [{"role": "user", "content": "And then?"}]


def check_answer(client: openai.OpenAI, messages: list) -> None:
    """The conversation goes on: the server takes `messages`, the client's own objects among them, and
    answers."""
    answer = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=[TRIP_TOOL], max_tokens=8,
                                            temperature=0).choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.role == "assistant" and (answer.message.content or answer.message.tool_calls)


def test_parse_returns_a_response_format_as_the_nested_model(client):
    choice = parse(client, PLAN, response_format=Trip).choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Trip)


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the client's, as it sends its own message
def test_a_parsed_answer_goes_back_into_the_conversation_as_the_client_made_it(client):
    message = parse(client, PLAN, response_format=Trip).choices[0].message
    check_answer(client, [*PLAN, message, {"role": "user", "content": "Shorter, please."}])


@pytest.mark.parametrize("tool_choice", FORCED.values(), ids=FORCED.keys())
def test_a_forced_pydantic_tool_call_comes_back_parsed_and_round_trips(client, tool_choice):
    choice = parse(client, PLAN, tools=[TRIP_TOOL], tool_choice=tool_choice, parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "Trip" and isinstance(call.function.parsed_arguments, Trip)
    check_answer(client, [*PLAN, choice.message, *reply_to(choice.message)])


def test_an_automatic_pydantic_tool_answer_is_text_or_parsed_calls_and_round_trips(client):
    choice = parse(client, PLAN, tools=[TRIP_TOOL], tool_choice="auto", logit_bias=ENDS_SOONER).choices[0]
    message = choice.message
    assert choice.finish_reason in ("stop", "tool_calls")
    if message.tool_calls:
        assert all(isinstance(call.function.parsed_arguments, Trip) for call in message.tool_calls)
    else:
        assert isinstance(message.content, str)
    check_answer(client, [*PLAN, message, *reply_to(message)])


def test_the_stream_helper_streams_a_response_format_and_parses_it(client):
    with client.chat.completions.stream(model=MODEL_ID, messages=PLAN, response_format=Trip, max_tokens=MAX_TOKENS,
                                        temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [event.delta for event in events if event.type == "content.delta"]
    [done] = [event for event in events if event.type == "content.done"]
    assert len(deltas) > 1 and "".join(deltas) == done.content
    assert isinstance(done.parsed, Trip) and final.choices[0].message.parsed == done.parsed


def test_the_stream_helper_streams_a_forced_pydantic_tool_call_and_parses_it(client):
    with client.chat.completions.stream(model=MODEL_ID, messages=PLAN, tools=[TRIP_TOOL],
                                        tool_choice=FORCED["named"], max_tokens=MAX_TOKENS, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [event.arguments_delta for event in events if event.type == "tool_calls.function.arguments.delta"]
    [done] = [event for event in events if event.type == "tool_calls.function.arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == done.arguments
    assert done.name == "Trip" and isinstance(done.parsed_arguments, Trip)
    [call] = final.choices[0].message.tool_calls
    assert call.function.parsed_arguments == done.parsed_arguments
