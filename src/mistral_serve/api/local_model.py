"""LocalModel: a served model whose engine runs in this process — engine deltas → chunk deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
import math
from typing import TYPE_CHECKING

from mistral_serve.api.errors import APIError
from mistral_serve.api.model_client import ModelClient
from mistral_serve.api.protocol import (
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, DeltaFunctionCall, DeltaMessage, DeltaToolCall, TokenLogprob,
    TopLogprob,
)
from mistral_serve.api.tools import ChoiceReader
from mistral_serve.engine.client import CompletionDelta, EngineBackend, EngineClient, EngineStats
from mistral_serve.engine.params import GuidedDecoding, SamplingParams

if TYPE_CHECKING:
    from mistral_serve.api.chat import Generation, GenerationProgress
    from mistral_serve.tokenizer import ChatTokenizer

# OpenAI's stand-in for a log probability too small to write (JSON has no -Infinity)
MIN_LOGPROB = -9999.0


class LocalModel(ModelClient):
    def __init__(self, engine: EngineClient):
        self.engine = engine

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def backend(self) -> EngineBackend:
        return self.engine.backend

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    def is_grammar_compiled(self, guided: GuidedDecoding) -> bool:
        return self.engine.is_grammar_compiled(guided)

    async def prepare_grammar(self, guided: GuidedDecoding) -> None:
        await self.engine.prepare_grammar(guided)

    async def chunks(self, generation: Generation, progress: GenerationProgress) -> AsyncIterator[ChatCompletionChunk]:
        readers = ([generation.tool_calling.reader() for _ in range(generation.params.n)]
                   if generation.tool_calling is not None else None)
        # prepare() had the engine validate these very prompt and params
        deltas = self.engine.generate(generation.prompt_token_ids, generation.params,
                                      request_id=generation.completion_id, tenant=generation.ticket.tenant,
                                      is_validated=True)
        async with aclosing(deltas):  # leaving early (client gone) closes it: the request is aborted
            is_begun = False
            async for delta in deltas:
                if delta.finish_reason == "abort":
                    raise APIError(503, "The generation was aborted by the server.", type="server_error")
                if not is_begun:
                    is_begun = True
                    for index in range(generation.params.n):
                        yield generation.chunk([ChunkChoice(index=index,
                                                            delta=DeltaMessage(role="assistant", content=""))])
                progress.on_tokens(generation, delta.index, len(delta.token_ids), delta.num_output_tokens,
                                   delta.finish_reason)
                if delta.index == 0:
                    progress.num_cached_tokens = delta.num_cached_tokens
                choice = _chunk_choice(self.tokenizer, delta, readers[delta.index] if readers else None)
                if choice is not None:
                    yield generation.chunk([choice])

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def start(self) -> None:
        self.engine.start()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)

    def abort_all(self, reason: str) -> None:
        self.engine.abort_all(reason)


def _chunk_choice(tokenizer: ChatTokenizer, delta: CompletionDelta, reader: ChoiceReader | None) -> ChunkChoice | None:
    """What one engine delta adds to its choice: content, pieces of tool calls, the end; None: nothing."""
    text, calls, finish_reason = delta.text, [], delta.finish_reason
    if reader is not None:
        text, calls = reader.on_delta(delta.text, delta.token_ids)
        if finish_reason:
            rest, finish_reason = reader.finish(finish_reason)  # text that held no call becomes content
            text += rest
    if not (text or calls or delta.logprobs or finish_reason):
        return None
    tool_calls = [DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                                function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
                  for call in calls]
    return ChunkChoice(index=delta.index,
                       delta=DeltaMessage(content=text if text or delta.logprobs else None,
                                          tool_calls=tool_calls or None),
                       logprobs=_logprobs(tokenizer, delta), finish_reason=finish_reason)


def _logprobs(tokenizer: ChatTokenizer, delta: CompletionDelta) -> ChoiceLogprobs | None:
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
