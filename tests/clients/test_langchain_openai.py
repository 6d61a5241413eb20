"""LangChain's ChatOpenAI, a chat-model wrapper: structured output by function calling and by JSON
schema, tools bound with a tool_choice, a tool result sent back, and streams of text and of calls."""

from functools import reduce
from operator import add

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
import pytest

from tests.clients.helpers import MAX_TOKENS, MODEL_ID, Trip, book_hotel, is_booking

BOOK = [HumanMessage("Book a hotel in Rome for two nights.")]
BOOK_HOTEL = tool(book_hotel)


@pytest.fixture
def llm(server, base_url) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL_ID, base_url=base_url, api_key=server.key, max_tokens=MAX_TOKENS, temperature=0,
                      seed=0)


def check_calls(message: AIMessage) -> None:
    """The message calls book_hotel, with arguments it accepts."""
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["name"] == "book_hotel" and is_booking(BOOK_HOTEL.invoke(call["args"]))


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_with_structured_output_returns_the_nested_model(llm, method):
    trip = llm.with_structured_output(Trip, method=method).invoke("Plan a trip to Rome.")
    assert isinstance(trip, Trip)


@pytest.mark.parametrize("tool_choice", ["book_hotel", "any"])
def test_bound_tools_with_a_tool_choice_come_back_as_parsed_tool_calls(llm, tool_choice):
    message = llm.bind_tools([book_hotel], tool_choice=tool_choice).invoke(BOOK)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    check_calls(message)


def test_a_tool_result_goes_back_and_the_model_answers(llm):
    with_tools = llm.bind_tools([book_hotel])
    call = llm.bind_tools([book_hotel], tool_choice="book_hotel").invoke(BOOK)
    results = [BOOK_HOTEL.invoke(tool_call) for tool_call in call.tool_calls]
    assert results and all(is_booking(result.content) for result in results)
    answer = with_tools.invoke([*BOOK, call, *results])
    assert isinstance(answer, AIMessage) and (answer.content or answer.tool_calls)


def test_a_stream_comes_in_chunks_that_add_up_to_the_answer(llm):
    chunks = list(llm.stream("Tell me about Rome."))
    assert len(chunks) > 1
    streamed = reduce(add, chunks)
    assert streamed.content == llm.invoke("Tell me about Rome.").content
    assert streamed.response_metadata["finish_reason"] in ("stop", "length")


def test_a_streamed_tool_call_adds_up_to_a_parsed_call(llm):
    chunks = list(llm.bind_tools([book_hotel], tool_choice="book_hotel").stream(BOOK))
    assert sum(1 for chunk in chunks if chunk.tool_call_chunks) > 1  # the arguments arrive as they are written
    check_calls(reduce(add, chunks))
