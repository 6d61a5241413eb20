"""PooledModel: a served model whose replies come from a pool of OpenAI-compatible upstreams.

The chat path is the gateway's own: the request was tokenized here with the model's tokenizer (its
context checked, its tokens charged to the key's limits) before anything is forwarded. What goes
upstream is the request as validated, always streamed and always asking for usage — in every chunk
(vLLM's `continuous_usage_stats`), so that a reply cut short is metered by exactly what reached the
client. Chunks come back with the gateway's completion id and the client's model name; an upstream
that gives no usage has its reply counted with our tokenizer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from mistral_serve.api.errors import APIError
from mistral_serve.api.model_client import ModelClient, UpstreamHealth
from mistral_serve.api.protocol import ChatCompletionChunk
from mistral_serve.api.upstream_chunks import UpstreamRelay
from mistral_serve.catalog import DEMO_MODEL_ID, card_for
from mistral_serve.engine.client import EngineStats, EngineStoppedError
from mistral_serve.engine.grammar_bounds import check_grammar_bounds
from mistral_serve.engine.params import SamplingParams
from mistral_serve.upstream.config import PoolSpec
from mistral_serve.upstream.discovery import discover_max_model_len
from mistral_serve.upstream.errors import (
    NoHealthyUpstreamError, UpstreamBrokenError, UpstreamMisconfiguredError, UpstreamRefusedError,
)
from mistral_serve.upstream.pool import UpstreamPool
from mistral_serve.upstream.routing import affinity_key

if TYPE_CHECKING:
    from mistral_serve.api.chat import Generation, GenerationProgress
    from mistral_serve.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096  # for a model of no known card whose upstreams do not say theirs
TENANT_HEADER = "X-Mistral-Serve-Tenant"  # the engine schedules the gateway's tenants fairly (engine_ticket.py)
# what is forwarded of a request, as the client sent it; the rest is set by the gateway (`upstream_body`)
FORWARDED_FIELDS = frozenset({
    "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format", "stop", "seed", "n", "logprobs",
    "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty", "top_k", "min_p", "repetition_penalty",
    "min_tokens", "ignore_eos",
})


class PooledModel(ModelClient):
    def __init__(self, model_id: str, pool: UpstreamPool, tokenizer: ChatTokenizer, max_model_len: int, *,
                 is_max_model_len_given: bool = True):
        """`is_max_model_len_given`: the operator set `max_model_len`; otherwise it is a default that the
        upstreams' own word replaces when the pool starts."""
        self.model_id = model_id
        self.pool = pool
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._is_max_model_len_given = is_max_model_len_given
        self._discovery: asyncio.Task | None = None
        self._abort_reason: str | None = None
        self._open_streams: set = set()
        self._aborted: set = set()  # streams `abort_all` closed

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def policy(self) -> str:
        return self.pool.spec.policy

    def upstreams(self) -> list[UpstreamHealth]:
        return [UpstreamHealth(member.name, member.url, member.state, member.num_in_flight, member.num_requests,
                               member.num_failures, member.last_error) for member in self.pool.members()]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The grammar's bounds are ours to keep: a schema past them is refused before it travels."""
        if params.guided is not None:
            check_grammar_bounds(params.guided)

    async def chunks(self, generation: Generation, progress: GenerationProgress) -> AsyncIterator[ChatCompletionChunk]:
        stream = await self._open(generation)
        relay = UpstreamRelay(generation, progress, self.tokenizer)
        self._open_streams.add(stream)
        try:
            async for event in stream:
                if "error" in event:  # the upstream failed after its first chunk, and said so
                    relay.on_cut()
                    raise _cut(generation, stream.member_name, _error_message(event))
                try:
                    chunks = list(relay.on_event(event))
                except ValueError as error:  # a chunk our model cannot hold: the upstream's fault, not the client's
                    raise UpstreamBrokenError(f"a chunk that is not OpenAI's ({type(error).__name__})") from None
                for chunk in chunks:
                    yield chunk
            if stream in self._aborted:
                raise EngineStoppedError(self._abort_reason)
            relay.on_end()
        except UpstreamBrokenError as error:
            relay.on_cut()
            if stream in self._aborted:
                raise EngineStoppedError(self._abort_reason) from None
            raise _cut(generation, stream.member_name, str(error)) from None
        finally:
            self._open_streams.discard(stream)
            self._aborted.discard(stream)
            await stream.aclose()  # a client gone, or anything else: the upstream sees its caller leave

    async def _open(self, generation: Generation):
        """The upstream's stream, begun: refusals are APIErrors, before any byte reaches the client."""
        body = upstream_body(generation, self.model_id)
        messages = body["messages"]
        headers = {TENANT_HEADER: generation.ticket.tenant}
        try:
            return await self.pool.open_stream(body, affinity_key=affinity_key(messages),
                                               request_id=generation.completion_id, headers=headers)
        except NoHealthyUpstreamError as error:  # the upstreams' names and faults are the operator's: logged
            logger.warning("%s: %s", generation.completion_id, error)
            raise APIError(503, f"The model {generation.request.model!r} cannot take requests now; try again "
                                "shortly.", type="server_error", code="no_healthy_upstream",
                           headers={"Retry-After": str(error.retry_after_s)}) from None
        except UpstreamRefusedError as error:  # about the request's content: another upstream would refuse it too
            status = error.status_code if 400 <= error.status_code < 500 else 400
            raise APIError(status, f"Invalid request: {_error_message(error.body or {})}",
                           code=_error_code(error.body or {})) from None
        except UpstreamMisconfiguredError as error:
            logger.error("model %s: %s", self.model_id, error)
            raise APIError(502, "The model's upstreams refused the gateway; the operator has been told.",
                           type="server_error", code="upstream_misconfigured") from None

    def stats(self) -> EngineStats | None:
        return None

    async def start(self) -> None:
        await self.pool.start()
        if not self._is_max_model_len_given:
            self._discovery = asyncio.create_task(self._learn_max_model_len(), name=f"context of {self.model_id}")

    async def _learn_max_model_len(self) -> None:
        """Ask the upstreams their context length until one answers: one still starting says nothing
        yet, and until then a request could be let through that is too long for it."""
        while True:
            length, num_answered = await discover_max_model_len(self.pool.spec)
            if length is not None:
                self._max_model_len = length
                return
            if num_answered:  # they answer, and keep it to themselves (a router): the operator must say
                logger.warning("pool %s: its upstreams do not say their context length; serving up to %d "
                               "tokens: set max_model_len in the pools file if theirs is shorter", self.model_id,
                               self._max_model_len)
                return
            await asyncio.sleep(self.pool.spec.health_interval_s)

    async def shutdown(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        self.abort_all("the server is shutting down")
        await self.pool.close()

    def abort_all(self, reason: str) -> None:
        """Close every upstream stream in flight: each reader ends, and `chunks` fails with
        EngineStoppedError(reason). The pool goes on taking requests."""
        self._abort_reason = reason
        for stream in list(self._open_streams):
            self._aborted.add(stream)
            asyncio.ensure_future(stream.aclose())


def upstream_body(generation: Generation, model_id: str) -> dict:
    """The request as it goes upstream: the client's fields that shape the reply, the sampling values
    and token cap the gateway settled on (its limits charged for exactly these), always streamed with
    usage in every chunk."""
    request, params = generation.request, generation.params
    body = request.model_dump(mode="json", include=FORWARDED_FIELDS, exclude_unset=True, by_alias=True)
    body.update(model=model_id, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p)
    return body


def _cut(generation: Generation, member: str, reason: str) -> APIError:
    logger.warning("%s: upstream %s failed mid-reply: %s", generation.completion_id, member, reason)
    return APIError(502, "The upstream serving this model failed during the reply, which is cut short; the "
                         "tokens delivered are the ones billed.", type="server_error", code="upstream_failed")


def _error_message(body: dict) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body.get("message") or body or "no detail")


def _error_code(body: dict) -> str | None:
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def pooled_model(spec: PoolSpec, *, allow_download: bool = False) -> PooledModel:
    """The model a pool spec describes, with its tokenizer loaded here (no weights: they live upstream)."""
    from mistral_serve.model.checkpoints.loader import resolve_checkpoint
    from mistral_serve.tokenizer import load_tokenizer

    source = spec.tokenizer or default_tokenizer_source(spec.model_id)
    if source is None:
        raise ValueError(f"pool {spec.model_id!r}: name its tokenizer (`tokenizer:` in the pools file: a checkpoint "
                         "directory, a GGUF file, a Mistral tokenizer file or a Hugging Face id); the gateway counts "
                         "tokens with it")
    tokenizer = load_tokenizer(resolve_checkpoint(source, allow_download=allow_download))
    max_model_len = spec.max_model_len or card_for(spec.model_id).context_length or DEFAULT_MAX_MODEL_LEN
    return PooledModel(spec.model_id, UpstreamPool(spec), tokenizer, max_model_len,
                       is_max_model_len_given=spec.max_model_len is not None)


def default_tokenizer_source(model_id: str) -> str | None:
    """Where a known model's tokenizer is without any download: Mistral's v3 tokenizer ships with
    mistral-common; the demo model's is inside its GGUF."""
    from mistral_serve.model.checkpoints.loader import DEMO_SOURCE

    if model_id == DEMO_MODEL_ID:
        return DEMO_SOURCE
    if model_id == "mistralai/Mistral-7B-Instruct-v0.3":
        import mistral_common

        return str(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    return None
