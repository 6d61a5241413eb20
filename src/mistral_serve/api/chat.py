"""A chat request → prompt tokens → the engine → `chat.completion.chunk`s.

There is one path: `stream_chunks`. A streaming reply sends its chunks as Server-Sent Events; a
non-streaming reply is gathered from the same chunks by `complete`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
import json
import logging
import math
import time
import uuid

from mistral_serve.api.errors import APIError, invalid_request
from mistral_serve.api.metrics import RequestTimer
from mistral_serve.api.protocol import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Choice, ChoiceLogprobs, ChunkChoice,
    DeltaMessage, PromptTokensDetails, ResponseMessage, TokenLogprob, TopLogprob, Usage,
)
from mistral_serve.catalog import ServedModel
from mistral_serve.engine.async_engine import EngineStoppedError
from mistral_serve.engine.engine import CompletionDelta
from mistral_serve.engine.params import SamplingParams
from mistral_serve.tokenizer import ChatTemplateError

logger = logging.getLogger(__name__)

# OpenAI's stand-in for a log probability too small to write (JSON has no -Infinity)
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class Generation:
    """A validated request, ready to run: nothing about it can be refused any more for its content."""

    request: ChatCompletionRequest
    served: ServedModel
    prompt_token_ids: list[int]
    params: SamplingParams
    timer: RequestTimer | None = None  # records latencies and token counts for /metrics
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def prepare(request: ChatCompletionRequest, served: ServedModel, timer: RequestTimer | None = None) -> Generation:
    """Tokenize and check the request; every problem is a 400 that says what to change."""
    engine = served.engine.engine
    messages = [message.model_dump(exclude_none=True) for message in request.messages]
    try:
        prompt = engine.tokenizer.encode_chat(messages)
    except ChatTemplateError as error:
        raise invalid_request(f"Invalid messages: {error}", param="messages") from None
    try:
        params = request.to_sampling_params()
    except ValueError as error:
        raise invalid_request(f"Invalid request: {error}") from None
    _check_context(len(prompt), request.max_new_tokens, served.context_length)
    try:
        engine.validate(prompt, params)
    except ValueError as error:
        param = "logit_bias" if "token id" in str(error) else None
        raise invalid_request(f"Invalid request: {error}", param=param) from None
    return Generation(request, served, prompt, params, timer)


def _check_context(num_prompt_tokens: int, max_new_tokens: int | None, context_length: int) -> None:
    if num_prompt_tokens >= context_length:
        raise invalid_request(
            f"This model's maximum context length is {context_length} tokens. However, your messages resulted "
            f"in {num_prompt_tokens} tokens, which leaves no room for a reply: shorten them by at least "
            f"{num_prompt_tokens - context_length + 1} tokens.", param="messages", code="context_length_exceeded")
    if max_new_tokens is not None and num_prompt_tokens + max_new_tokens > context_length:
        over = num_prompt_tokens + max_new_tokens - context_length
        raise invalid_request(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{num_prompt_tokens + max_new_tokens} tokens ({num_prompt_tokens} in the messages, {max_new_tokens} "
            f"in the completion), {over} too many. Reduce the length of the messages or the completion.",
            param="max_tokens", code="context_length_exceeded")


# the one path

async def stream_chunks(generation: Generation) -> AsyncIterator[ChatCompletionChunk]:
    """The role chunk of each choice, its content chunks (the last with finish_reason), then one usage
    chunk with no choices — always; a stream without include_usage drops it."""
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=generation.completion_id, created=generation.created,
                                   model=generation.request.model, choices=choices, usage=usage)

    for index in range(generation.params.n):
        yield chunk([ChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    num_output_tokens: dict[int, int] = {}
    num_cached_tokens = 0  # the prompt is counted once: as the first choice saw it
    engine = generation.served.engine
    timer = generation.timer
    outcome = "aborted"  # unless the loop below runs to its end or fails
    try:
        deltas = engine.generate(generation.prompt_token_ids, generation.params, request_id=generation.completion_id)
        async with aclosing(deltas):  # leaving early (client gone) closes it: the request is aborted
            async for delta in deltas:
                if delta.finish_reason == "abort":
                    raise APIError(503, "The generation was aborted by the server.", type="server_error")
                if timer is not None:
                    timer.on_tokens(delta.index, len(delta.token_ids))
                num_output_tokens[delta.index] = delta.num_output_tokens
                if delta.index == 0:
                    num_cached_tokens = delta.num_cached_tokens
                if delta.text or delta.logprobs or delta.finish_reason:
                    yield chunk([ChunkChoice(index=delta.index,
                                             delta=DeltaMessage(content=delta.text if delta.text or delta.logprobs
                                                                else None),
                                             logprobs=_logprobs(engine.engine.tokenizer, delta),
                                             finish_reason=delta.finish_reason)])
        outcome = "finished"
    except EngineStoppedError:
        outcome = "failed"
        raise APIError(503, "The model is not running; try again shortly.", headers={"Retry-After": "5"}) from None
    except ValueError as error:  # the engine refused the request after all
        outcome = "failed"
        raise invalid_request(f"Invalid request: {error}") from None
    except Exception:
        outcome = "failed"
        raise
    finally:
        if timer is not None:
            timer.on_end(len(generation.prompt_token_ids), sum(num_output_tokens.values()), outcome)
    num_prompt_tokens = len(generation.prompt_token_ids)
    num_completion_tokens = sum(num_output_tokens.values())
    yield chunk([], Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                          total_tokens=num_prompt_tokens + num_completion_tokens,
                          prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens)))


def _logprobs(tokenizer, delta: CompletionDelta) -> ChoiceLogprobs | None:
    if delta.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        token_bytes = tokenizer.token_bytes(token_id)
        logprob = max(logprob, MIN_LOGPROB) if math.isfinite(logprob) else MIN_LOGPROB
        return {"token": token_bytes.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(token_bytes)}

    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(item.token_id, item.logprob),
                     top_logprobs=[TopLogprob(**entry(token_id, logprob)) for token_id, logprob in item.top_logprobs])
        for item in delta.logprobs])


# the two ways to answer

async def sse_events(generation: Generation) -> AsyncIterator[str]:
    """Server-Sent Events: each chunk, an error as an event with an `error` object, then [DONE]."""
    include_usage = generation.request.is_usage_streamed
    try:
        async with aclosing(stream_chunks(generation)) as chunks:
            async for chunk in chunks:
                if chunk.usage is None or include_usage:
                    yield f"data: {json.dumps(chunk_body(chunk, include_usage))}\n\n"
    except APIError as error:
        yield f"data: {json.dumps(error.body())}\n\n"
    except Exception:  # a bug or an engine failure: the client still gets an error, not a cut stream
        logger.exception("chat completion %s failed while streaming", generation.completion_id)
        error = APIError(500, "The server had an error while processing your request.", type="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    yield "data: [DONE]\n\n"


def chunk_body(chunk: ChatCompletionChunk, include_usage: bool) -> dict:
    """OpenAI's chunk: a delta carries only what it has; `usage` is there (null until the last) only
    when asked for."""
    body = chunk.model_dump(mode="json")
    for choice in body["choices"]:
        choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
    if not include_usage:
        del body["usage"]
    return body


async def complete(generation: Generation) -> ChatCompletionResponse:
    """The non-streaming reply, gathered from the chunks."""
    n = generation.params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob] | None] = [None] * n
    finish_reasons: list[str | None] = [None] * n
    usage = None
    async with aclosing(stream_chunks(generation)) as chunks:
        async for chunk in chunks:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index].append(choice.delta.content or "")
                if choice.logprobs is not None:
                    logprobs[choice.index] = (logprobs[choice.index] or []) + (choice.logprobs.content or [])
                finish_reasons[choice.index] = choice.finish_reason or finish_reasons[choice.index]
    if None in finish_reasons:  # the engine ended the request without finishing every choice: a bug
        logger.error("chat completion %s ended with unfinished choices %s", generation.completion_id, finish_reasons)
        raise APIError(500, "The server had an error while processing your request.", type="server_error")
    wants_logprobs = generation.params.logprobs
    return ChatCompletionResponse(
        id=generation.completion_id, created=generation.created, model=generation.request.model,
        choices=[Choice(index=index, message=ResponseMessage(content="".join(texts[index])),
                        logprobs=ChoiceLogprobs(content=logprobs[index] or []) if wants_logprobs else None,
                        finish_reason=finish_reasons[index])
                 for index in range(n)],
        usage=usage)
