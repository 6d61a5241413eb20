"""ModelClient: all that the chat path sees of what runs a served model.

Two implementations feed the one chat path (chat.py), so streaming, tools, JSON modes, usage rows,
limits and the workbench behave the same whichever backs a model:

- LocalModel (local_model.py): our engine, in this process, behind its EngineClient;
- PooledModel (pooled_model.py): a pool of OpenAI-compatible upstreams (`mistral-serve engine`
  processes, vLLM, SGLang, llama.cpp's server, or a router in front of them), over HTTP.

The chat path tokenizes with the client's tokenizer (to check the context, to charge limits before
any work, to count what an upstream does not), asks the client to validate, then takes the reply
as a stream of chunk deltas, reporting token counts to a GenerationProgress as they come.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mistral_serve.engine.client import EngineBackend, EngineStats
from mistral_serve.engine.params import GuidedDecoding, SamplingParams

if TYPE_CHECKING:
    from mistral_serve.api.chat import Generation, GenerationProgress
    from mistral_serve.api.protocol import ChatCompletionChunk
    from mistral_serve.tokenizer import ChatTokenizer


@dataclass(frozen=True)
class UpstreamHealth:
    """One upstream of a pool, as /ready and /metrics report it."""

    name: str
    url: str
    state: str  # "healthy" or "ejected" (out of rotation until a health check passes)
    num_in_flight: int
    num_requests: int
    num_failures: int
    last_error: str | None


class ModelClient(ABC):
    """One served model, as the chat path uses it. Every method may be called from the event loop;
    none blocks on the model."""

    @property
    @abstractmethod
    def tokenizer(self) -> ChatTokenizer:
        """The model's tokenizer, read-only, from any thread."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """The most tokens one request may hold, prompt and generated together."""

    @property
    def backend(self) -> EngineBackend | None:
        """Where and on which kernels the model runs, when it runs in this process."""
        return None

    @property
    def policy(self) -> str | None:
        """How a pool picks the upstream of a request; None for a local engine."""
        return None

    @abstractmethod
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (GuidedDecodingError for the grammar) for a request that cannot run. Cheap."""

    def is_grammar_compiled(self, guided: GuidedDecoding) -> bool:
        """`prepare_grammar(guided)` would answer at once. A client that compiles elsewhere has nothing
        to prepare."""
        return True

    async def prepare_grammar(self, guided: GuidedDecoding) -> None:
        """Compile `guided` ahead of `chunks` (see EngineClient.prepare_grammar)."""

    @abstractmethod
    def chunks(self, generation: Generation, progress: GenerationProgress) -> AsyncIterator[ChatCompletionChunk]:
        """The generation's chunks (each choice's role chunk once its first token is out, then its
        deltas, the last with its finish_reason), without the usage chunk: token counts go to
        `progress` as they come. Errors are raised as engine errors or APIError; closing the iterator
        stops the generation at once."""

    @abstractmethod
    def stats(self) -> EngineStats | None:
        """How busy the engine is now; None when it runs elsewhere (a pool: see `upstreams`)."""

    def upstreams(self) -> list[UpstreamHealth]:
        """The members of a pool and their health, for /ready, /metrics, the model objects and the
        workbench; none for a local engine."""
        return []

    # lifecycle

    @abstractmethod
    async def start(self) -> None:
        pass

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop; what is in flight is aborted."""

    @abstractmethod
    def abort_all(self, reason: str) -> None:
        """Abort every request in flight; each fails with EngineStoppedError(reason). Keeps running."""
