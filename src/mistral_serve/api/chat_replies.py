"""The two ways to answer a chat request from its chunks (chat.start): Server-Sent Events, or one
JSON reply gathered from the same chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mistral_serve.api.admission import CLIENT_CLOSED_REQUEST, RequestTicket
from mistral_serve.api.chat import Generation, compile_grammar, prepare, reserve, start, validate
from mistral_serve.api.compilations import Compilations
from mistral_serve.api.errors import APIError
from mistral_serve.api.metrics import ServingMetrics
from mistral_serve.api.output_caps import OutputCaps
from mistral_serve.api.protocol import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, Choice, ChoiceLogprobs, FunctionCallOut,
    ResponseMessage, TokenLogprob, ToolCall,
)
from mistral_serve.api.sse import ClientDisconnected, EventStreamResponse, until_disconnected
from mistral_serve.catalog import ServedModel

logger = logging.getLogger(__name__)


async def answer(request: Request, body: ChatCompletionRequest, served: ServedModel, ticket: RequestTicket,
                 caps: OutputCaps, metrics: ServingMetrics, compilations: Compilations) -> Response:
    """The chat path of an admitted request, from its body to the reply (see `reply`)."""
    # tokenizing and checking take milliseconds to a tenth of a second: off the event loop
    generation = await asyncio.to_thread(prepare, body, served, metrics.timer(served.id), ticket)
    generation = await reserve(generation, caps)  # its tokens paid for before its grammar compiles
    await asyncio.to_thread(validate, generation)
    try:
        await compile_grammar(request, generation, compilations)  # in a worker process
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # gone while it compiled: the compiling stopped
    return await reply(request, generation, ticket.headers)


async def reply(request: Request, generation: Generation, headers: dict[str, str]) -> Response:
    """Run the generation and answer `request` with Server-Sent Events or one JSON reply, carrying
    `headers`; a 499 when the client leaves first. A stream outlives the route that returns it: it
    takes the generation's ticket and closes it when it ends."""
    chunks = None
    try:
        # queued until the engine takes it: a full queue or a queue timeout is a 503 before any byte is sent
        chunks = await until_disconnected(request, start(generation))
        if generation.request.stream:
            response = EventStreamResponse(sse_events(generation, chunks), source=chunks,
                                           on_close=generation.ticket.keep_open().close)
            response.headers.update(headers)
            return response
        completion = await until_disconnected(request, complete(generation, chunks))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is listening
    finally:
        if chunks is not None and not generation.request.stream:
            await chunks.aclose()  # aborts the generation if complete() did not read it to the end
    return JSONResponse(completion.model_dump(mode="json"), headers=headers)


async def sse_events(generation: Generation, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[str]:
    """Server-Sent Events of `chunks` (from `start`): each chunk, an error as an event with an `error`
    object, then [DONE]."""
    include_usage = generation.request.is_usage_streamed
    try:
        async with aclosing(chunks):
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
        for call in choice["delta"].get("tool_calls", ()):
            for key in [key for key, value in call.items() if value is None]:
                del call[key]
            call["function"] = {key: value for key, value in call["function"].items() if value is not None}
    if not include_usage:
        del body["usage"]
    return body


async def complete(generation: Generation, chunks: AsyncIterator[ChatCompletionChunk]) -> ChatCompletionResponse:
    """The non-streaming reply, gathered from `chunks` (from `start`)."""
    n = generation.params.n
    texts: list[list[str]] = [[] for _ in range(n)]
    calls: list[dict[int, dict]] = [{} for _ in range(n)]  # per choice: call index → id, name, argument pieces
    logprobs: list[list[TokenLogprob] | None] = [None] * n
    finish_reasons: list[str | None] = [None] * n
    usage = None
    async with aclosing(chunks):
        async for chunk in chunks:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index].append(choice.delta.content or "")
                for call in choice.delta.tool_calls or ():
                    gathered = calls[choice.index].setdefault(call.index, {"id": call.id, "name": call.function.name,
                                                                           "arguments": []})
                    gathered["arguments"].append(call.function.arguments or "")
                if choice.logprobs is not None:  # extended in place: a long reply is not copied per token
                    logprobs[choice.index] = logprobs[choice.index] or []
                    logprobs[choice.index].extend(choice.logprobs.content or ())
                finish_reasons[choice.index] = choice.finish_reason or finish_reasons[choice.index]
    if None in finish_reasons:  # the engine ended the request without finishing every choice: a bug
        logger.error("chat completion %s ended with unfinished choices %s", generation.completion_id, finish_reasons)
        raise APIError(500, "The server had an error while processing your request.", type="server_error")
    wants_logprobs = generation.params.logprobs
    return ChatCompletionResponse(
        id=generation.completion_id, created=generation.created, model=generation.request.model,
        choices=[Choice(index=index, message=_message("".join(texts[index]), calls[index]),
                        logprobs=ChoiceLogprobs(content=logprobs[index] or []) if wants_logprobs else None,
                        finish_reason=finish_reasons[index])
                 for index in range(n)],
        usage=usage)


def _message(text: str, calls: dict[int, dict]) -> ResponseMessage:
    """A choice's message: with tool calls, content is null unless the model wrote text before them.
    The calls are as streamed: with a finish_reason other than "tool_calls", the last may be cut."""
    if not calls:
        return ResponseMessage(content=text)
    return ResponseMessage(content=text or None, tool_calls=[
        ToolCall(id=call["id"], function=FunctionCallOut(name=call["name"], arguments="".join(call["arguments"])))
        for _, call in sorted(calls.items())])
