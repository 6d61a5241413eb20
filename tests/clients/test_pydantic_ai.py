"""Pydantic AI, an agent framework, on its Chat Completions model: an agent's output as a tool call
or as the response format, a tool it runs and whose result it sends back, and both kinds of output
streamed."""

from pydantic_ai import Agent, NativeOutput, RunContext
from pydantic_ai.messages import ToolReturnPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
import pytest

from tests.clients.helpers import MAX_TOKENS, MODEL_ID, Trip, book_hotel, is_booking

SETTINGS = {"max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0}
BOOK = "Book a hotel in Rome for two nights, then plan the trip."


@pytest.fixture
def model(server, base_url) -> OpenAIChatModel:
    return OpenAIChatModel(MODEL_ID, provider=OpenAIProvider(base_url=base_url, api_key=server.key))


def books_first(ctx: RunContext) -> dict:
    """The first request must call book_hotel; the next ones may not call it again."""
    return {**SETTINGS, "tool_choice": ["book_hotel"] if ctx.run_step == 1 else "none"}


def test_an_agent_returns_the_nested_model_through_its_output_tool(model):
    result = Agent(model, output_type=Trip, model_settings=SETTINGS).run_sync("Plan a trip to Rome.")
    assert isinstance(result.output, Trip)


def test_an_agent_returns_the_nested_model_as_its_response_format(model):
    result = Agent(model, output_type=NativeOutput(Trip), model_settings=SETTINGS).run_sync("Plan a trip to Rome.")
    assert isinstance(result.output, Trip)


def test_an_agent_runs_a_forced_tool_and_answers_with_its_result(model):
    agent = Agent(model, output_type=NativeOutput(Trip), tools=[book_hotel], model_settings=books_first)
    result = agent.run_sync(BOOK)
    returns = [part for message in result.all_messages() for part in message.parts if isinstance(part, ToolReturnPart)]
    assert returns and all(part.tool_name == "book_hotel" and is_booking(part.content) for part in returns)
    assert isinstance(result.output, Trip)


def test_an_agent_streams_text_in_deltas_that_make_its_output(model):
    with Agent(model, model_settings=SETTINGS).run_stream_sync("Tell me about Rome.") as result:
        deltas = list(result.stream_text(delta=True, debounce_by=None))
        output = result.get_output()
    assert len(deltas) > 1 and "".join(deltas) == output


def test_an_agent_streams_ever_more_complete_models(model):
    agent = Agent(model, output_type=NativeOutput(Trip), model_settings=SETTINGS)
    with agent.run_stream_sync("Plan a trip to Rome.") as result:
        partials = list(result.stream_output(debounce_by=None))
        output = result.get_output()
    assert len(partials) > 1 and all(isinstance(partial, Trip) for partial in partials)
    assert partials[-1] == output
