"""A chat request → prompt tokens → the engine client → `chat.completion.chunk`s.

There is one path: `stream_chunks`. A streaming reply sends its chunks as Server-Sent Events; a
non-streaming reply is gathered from the same chunks (chat_replies.py picks between them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
import time

from fastapi import Request

from mistral_serve.api.admission import CLIENT_CLOSED_REQUEST, GenerationEnd, RequestTicket
from mistral_serve.api.compilations import Compilations
from mistral_serve.api.errors import APIError, invalid_request
from mistral_serve.api.metrics import RequestTimer
from mistral_serve.api.output_caps import OutputCaps
from mistral_serve.api.protocol import ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, PromptTokensDetails, Usage
from mistral_serve.api.sse import until_disconnected
from mistral_serve.api.tools import ToolCalling, tool_calls_token_id
from mistral_serve.catalog import ServedModel
from mistral_serve.engine.client import (
    EngineOverloadedError, EngineStoppedError, GrammarCompilerBusyError, GuidedDecodingError, QueueTimeoutError,
)
from mistral_serve.engine.params import SamplingParams
from mistral_serve.tokenizer import ChatTemplateError


OVERLOADED_RETRY_AFTER_S = "2"  # a full queue drains within seconds


@dataclass(frozen=True)
class Generation:
    """A request the engine client has validated, ready to run: nothing about it can be refused any
    more for its content."""

    request: ChatCompletionRequest
    served: ServedModel
    prompt_token_ids: list[int]
    params: SamplingParams
    timer: RequestTimer  # records latencies and token counts for /metrics
    ticket: RequestTicket  # is told how the request went, for its usage row
    tool_calling: ToolCalling | None = None  # how the output is read for tool calls; None: never
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def completion_id(self) -> str:
        return self.ticket.request_id

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        """A chunk of this generation's reply."""
        return ChatCompletionChunk(id=self.completion_id, created=self.created, model=self.request.model,
                                   choices=choices, usage=usage)


def prepare(request: ChatCompletionRequest, served: ServedModel, timer: RequestTimer,
            ticket: RequestTicket) -> Generation:
    """Tokenize and check the request; every problem is a 400 that says what to change. Its grammar,
    if any, is compiled later, by `validate`, once its tokens are paid for."""
    client = served.client
    tool_calling = _tool_calling(request, served)
    messages = [message.model_dump(exclude_none=True, by_alias=True) for message in request.messages]
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
    try:
        prompt = client.tokenizer.encode_chat(messages, tools=tools)
    except ChatTemplateError as error:
        raise invalid_request(f"Invalid messages: {error}", param="messages") from None
    try:
        params = request.to_sampling_params(**served.card.sampling_defaults)
    except ValueError as error:
        raise invalid_request(f"Invalid request: {error}", param=_guided_param(request)) from None
    if tool_calling is not None and tool_calling.is_forced:
        prompt = [*prompt, tool_calling.token_id]  # the grammar writes the calls that follow it
    elif request.effective_tool_choice == "none":  # the tools stay in the prompt; calling them is banned
        params = replace(params, logit_bias={**params.logit_bias, tool_calls_token_id(client.tokenizer): -100.0})
    _check_context(len(prompt), request.max_new_tokens, client.max_model_len)
    return Generation(request, served, prompt, params, timer, ticket, tool_calling)


async def reserve(generation: Generation, caps: OutputCaps) -> Generation:
    """Charge the generation's tokens to its key's and account's limits (a 429 if they cannot take
    them): its prompt and the most its choices may generate. That most becomes its max_tokens."""
    params = generation.params
    num_left = generation.served.client.max_model_len - len(generation.prompt_token_ids)
    num_per_choice = caps.max_tokens_per_choice(params, num_left)
    num_per_choice = await generation.ticket.reserve(len(generation.prompt_token_ids), params.n, params.max_tokens,
                                                     num_per_choice)
    return replace(generation, params=replace(params, max_tokens=num_per_choice))


def validate(generation: Generation) -> None:
    """The engine client's one validation of the request, the bounds on its grammar included; the
    grammar itself is compiled by `compile_grammar`, after."""
    request = generation.request
    try:
        generation.served.client.validate(generation.prompt_token_ids, generation.params)
    except GuidedDecodingError as error:
        raise invalid_request(f"Invalid request: {error}", param=_guided_param(request), code=error.code) from None
    except ValueError as error:
        param = "logit_bias" if "token id" in str(error) else None
        raise invalid_request(f"Invalid request: {error}", param=param) from None


async def compile_grammar(request: Request, generation: Generation, compilations: Compilations) -> None:
    """Have the engine client compile the request's grammar, if it has one the client has not compiled
    yet: at most one compilation per account at a time (429), stopped if the client leaves
    (ClientDisconnected). A grammar that cannot be honoured is a 400 naming its field."""
    guided = generation.params.guided
    client = generation.served.client
    if guided is None:
        return
    try:
        if client.is_grammar_compiled(guided):  # answers at once: no compiler taken
            await client.prepare_grammar(guided)
            return
        with compilations.of_account(generation.ticket.account_id):
            await until_disconnected(request, client.prepare_grammar(guided))
    except GuidedDecodingError as error:
        raise invalid_request(f"Invalid request: {error}", param=_guided_param(generation.request),
                              code=error.code) from None
    except GrammarCompilerBusyError as error:
        raise APIError(503, f"The server is busy ({error}); try again shortly.", type="server_error",
                       code="server_overloaded", headers={"Retry-After": OVERLOADED_RETRY_AFTER_S}) from None


def _tool_calling(request: ChatCompletionRequest, served: ServedModel) -> ToolCalling | None:
    """How to read this request's output for calls; a 400 when the model cannot call tools."""
    token_id = tool_calls_token_id(served.client.tokenizer)
    if request.tools is not None and token_id is None:
        raise invalid_request(f"The model {request.model!r} does not support 'tools' (function calling); "
                              "send the request without tools, or to a model that supports them.",
                              param="tools", code="unsupported_parameter")
    if request.effective_tool_choice in (None, "none"):
        return None
    return ToolCalling(token_id, request.is_tool_call_forced, request.max_num_tool_calls)


def _guided_param(request: ChatCompletionRequest) -> str | None:
    """The field whose schema a grammar error is about."""
    if request.is_tool_call_forced:
        return "tools"
    return "response_format" if request.response_format is not None else None


def _check_context(num_prompt_tokens: int, max_new_tokens: int | None, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your messages resulted "
            f"in {num_prompt_tokens} tokens, which leaves no room for a reply: shorten them by at least "
            f"{num_prompt_tokens - max_model_len + 1} tokens.", param="messages", code="context_length_exceeded")
    if max_new_tokens is not None and num_prompt_tokens + max_new_tokens > max_model_len:
        over = num_prompt_tokens + max_new_tokens - max_model_len
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_new_tokens} tokens ({num_prompt_tokens} in the messages, {max_new_tokens} "
            f"in the completion), {over} too many. Reduce the length of the messages or the completion.",
            param="max_tokens", code="context_length_exceeded")


# the one path

async def start(generation: Generation) -> BegunChunks:
    """The request's chunks, begun: once this returns, the engine has taken the request and produced
    its first token, so a refusal (a full queue, a queue timeout, the engine stopping) is raised here
    as an APIError, before any byte of the reply is sent. Closing the iterator aborts the request."""
    chunks = stream_chunks(generation)
    try:
        first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise
    return BegunChunks(first, chunks)


class BegunChunks:
    """The first chunk, then the rest; `aclose()` closes the rest even if iteration never began."""

    def __init__(self, first: ChatCompletionChunk, rest: AsyncIterator[ChatCompletionChunk]):
        self._first: ChatCompletionChunk | None = first
        self._rest = rest

    def __aiter__(self) -> BegunChunks:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


async def stream_chunks(generation: Generation) -> AsyncIterator[ChatCompletionChunk]:
    """The role chunk of each choice (once the first token is out), its content chunks (the last with
    finish_reason), then one usage chunk with no choices — always; a stream without include_usage
    drops it."""
    progress = GenerationProgress()
    is_usage_in_every_chunk = generation.request.is_usage_streamed_with_every_chunk
    try:
        chunks = generation.served.client.chunks(generation, progress)
        async with aclosing(chunks):  # leaving early (client gone) closes it: the generation stops
            async for chunk in chunks:
                yield chunk.model_copy(update={"usage": progress.usage(generation)}) if is_usage_in_every_chunk else chunk
        progress.outcome, progress.http_status = "finished", 200
    except EngineStoppedError:
        progress.http_status = 503
        raise APIError(503, "The model is not running; try again shortly.", headers={"Retry-After": "5"}) from None
    except (EngineOverloadedError, QueueTimeoutError, GrammarCompilerBusyError) as error:
        progress.http_status = 503
        raise APIError(503, f"The server is busy ({error}); try again shortly.", type="server_error",
                       code="server_overloaded", headers={"Retry-After": OVERLOADED_RETRY_AFTER_S}) from None
    except ValueError as error:  # the engine refused the request after all
        progress.http_status = 400
        raise invalid_request(f"Invalid request: {error}") from None
    except APIError as error:
        progress.http_status = error.status_code
        raise
    except Exception:
        progress.http_status = 500
        raise
    finally:
        progress.on_end(generation)
    yield generation.chunk([], progress.usage(generation))


@dataclass
class GenerationProgress:
    """How far a generation got, as its model client reports it: what its end reports to /metrics and
    to the usage row."""

    num_output_tokens: dict[int, int] = field(default_factory=dict)  # per choice
    num_cached_tokens: int = 0  # the prompt is counted once: as the first choice saw it
    num_prompt_tokens: int | None = None  # as the engine counted them, when it says; else the prompt's
    finish_reason: str | None = None  # the first choice's; "cut" when an upstream broke off the stream
    outcome: str = "aborted"  # unless the generation runs to its end ("finished") or fails
    http_status: int | None = None  # set when it fails

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.num_output_tokens.values())

    def num_prompt_tokens_of(self, generation: Generation) -> int:
        return len(generation.prompt_token_ids) if self.num_prompt_tokens is None else self.num_prompt_tokens

    def usage(self, generation: Generation) -> Usage:
        """The usage so far; at the end, the request's."""
        num_prompt_tokens = self.num_prompt_tokens_of(generation)
        return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=self.num_completion_tokens,
                     total_tokens=num_prompt_tokens + self.num_completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens))

    def on_tokens(self, generation: Generation, index: int, num_new_tokens: int, num_output_tokens: int,
                  finish_reason: str | None) -> None:
        """Choice `index` has `num_new_tokens` more, `num_output_tokens` in all; `finish_reason` once it ends."""
        generation.timer.on_tokens(index, num_new_tokens)
        if num_new_tokens:
            generation.ticket.on_first_token()
        self.num_output_tokens[index] = num_output_tokens
        if index == 0:
            self.finish_reason = finish_reason or self.finish_reason

    def on_end(self, generation: Generation) -> None:
        if self.http_status is not None and self.outcome != "finished":
            self.outcome = "failed"
        num_prompt_tokens = self.num_prompt_tokens_of(generation)
        generation.timer.on_end(num_prompt_tokens, self.num_completion_tokens, self.outcome)
        status = {"finished": "ok", "failed": "error", "aborted": "aborted"}[self.outcome]
        generation.ticket.on_generation_end(GenerationEnd(
            status, self.http_status or CLIENT_CLOSED_REQUEST, num_prompt_tokens, self.num_cached_tokens,
            self.num_completion_tokens, self.finish_reason))
