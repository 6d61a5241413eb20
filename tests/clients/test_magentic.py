"""magentic: prompt functions whose return type the server must honour. Structured output and tool
calls are forced tool calls, every request streams, and text streams as a StreamedStr."""

from collections.abc import Iterable

from magentic import (Chat, FunctionCall, FunctionResultMessage, OpenaiChatModel, ParallelFunctionCall,
                      StreamedStr, UserMessage, prompt)
import pytest

from tests.clients.helpers import MAX_TOKENS, MODEL_ID, Stop, Trip, book_hotel, is_booking

BOOK = "Book a hotel in Rome for two nights."


@pytest.fixture(autouse=True)
def chat_model(server, base_url):
    """The model every prompt function here uses."""
    model = OpenaiChatModel(MODEL_ID, api_key=server.key, base_url=base_url, max_tokens=MAX_TOKENS, temperature=0,
                            seed=0)
    with model:
        yield model


@prompt("Plan a trip to {city}.")
def plan_trip(city: str) -> Trip: ...


@prompt("List the stops of a trip to {city}.")
def list_stops(city: str) -> Iterable[Stop]: ...


@prompt(BOOK, functions=[book_hotel])
def ask_to_book() -> FunctionCall[str]: ...


@prompt(BOOK, functions=[book_hotel])
def ask_to_book_all() -> ParallelFunctionCall[str]: ...


@prompt("Tell me about {city}.")
def tell(city: str) -> str: ...


@prompt("Tell me about {city}.")
def tell_streamed(city: str) -> StreamedStr: ...


def test_a_prompt_function_returns_the_nested_model():
    trip = plan_trip("Rome")
    assert isinstance(trip, Trip) and isinstance(trip.start.city, str)


def test_a_prompt_function_yields_the_validated_models_of_an_iterable():
    stops = list_stops("Rome")
    assert all(isinstance(stop, Stop) for stop in stops)


def test_a_function_call_runs_the_tool_with_the_arguments_it_was_given():
    call = ask_to_book()
    assert isinstance(call, FunctionCall)
    assert is_booking(call())


def test_a_parallel_function_call_runs_each_call():
    calls = ask_to_book_all()
    results = calls()
    assert len(results) == len(list(calls)) >= 1
    assert all(is_booking(result) for result in results)


def test_a_chat_sends_the_tool_result_back_and_streams_the_answer():
    chat = Chat([UserMessage(BOOK)], functions=[book_hotel], output_types=[FunctionCall[str]]).submit()
    chat = chat.exec_function_call()
    assert isinstance(chat.last_message, FunctionResultMessage) and is_booking(chat.last_message.content)
    answer = Chat(chat.messages, functions=[book_hotel], output_types=[StreamedStr]).submit().last_message.content
    assert isinstance(answer, StreamedStr) and answer.to_string()


def test_a_streamed_str_comes_in_chunks_that_make_the_whole_answer():
    chunks = list(tell_streamed("Rome"))
    assert len(chunks) > 1
    assert "".join(chunks) == tell("Rome")
