"""EngineClient: all that the API sees of the engine in its process (AsyncEngine), behind a small
surface (vLLM's EngineClient in spirit); api/local_model.py makes it the chat path's ModelClient, whose
other implementation is a pool of remote upstreams (api/pooled_model.py).

This module is light on purpose (no torch, no model): the API and the gateway import it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mistral_serve.engine.params import GuidedDecoding, SamplingParams

if TYPE_CHECKING:
    from mistral_serve.tokenizer import ChatTokenizer


class EngineStoppedError(RuntimeError):
    pass


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the request was not queued. Try again shortly."""


class QueueTimeoutError(RuntimeError):
    """The request waited in the queue longer than the engine's queue timeout and was dropped."""


class GuidedDecodingError(ValueError):
    """The request's grammar (a JSON schema, forced tool calls) cannot be honoured."""

    code: str | None = None  # the API error's code


class GrammarTooLargeError(GuidedDecodingError):
    """The grammar's spec is past one of the bounds checked before any compiling (grammar_bounds.py);
    the message names the bound."""

    code = "grammar_too_large"


class GrammarTooComplexError(GuidedDecodingError):
    """Compiling the grammar went past the compiler's time or memory limit (grammar_bounds.py)."""

    code = "grammar_too_complex"


class GrammarCompilerBusyError(RuntimeError):
    """Every grammar compiler stayed busy for longer than a request may wait for one: try again shortly."""


@dataclass(frozen=True)
class SampledLogprob:
    """The log probability of a sampled token, and the most likely tokens at its place."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, log probability), most likely first


@dataclass(frozen=True)
class CompletionDelta:
    """What one step added to one choice of a request."""

    request_id: str
    index: int  # choice index
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampledLogprob, ...] | None  # None unless the request asked for logprobs
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int  # so far, for this choice
    is_request_finished: bool = False  # every choice of the request has finished
    error: BaseException | None = None  # set on the final deltas of a request the model run failed


@dataclass(frozen=True)
class EngineStats:
    """How busy an engine is, as /metrics reports it."""

    num_running: int  # sequences being prefilled or decoded
    num_waiting: int  # sequences queued for a place in the batch
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since the start
    num_prefix_cache_hits: int = 0  # of them, those found there


@dataclass(frozen=True)
class EngineBackend:
    """Where and on which kernels a served model runs: for the log, /ready and the model objects."""

    device: str  # "cpu", "cuda:0"
    dtype: str  # of the activations and the KV cache
    kernels: str  # our CPU kernels (instruction set, tile units, OpenMP), or torch's and why
    kernel_path: str  # which parts of the model run on them

    def describe(self) -> str:
        """In one line, for the command line."""
        return f"{self.device}, {self.dtype}; kernels: {self.kernels}; {self.kernel_path}"

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "kernels": self.kernels, "kernel_path": self.kernel_path}


class EngineClient(ABC):
    """One served model's engine, as the API uses it. Every method may be called from the event loop;
    none of them blocks on the model."""

    @property
    @abstractmethod
    def tokenizer(self) -> ChatTokenizer:
        """The model's tokenizer. Callers only read with it (encode_chat, token_bytes, decode), from
        any thread."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """The most tokens one request may hold, prompt and generated together."""

    @property
    @abstractmethod
    def backend(self) -> EngineBackend:
        """Where and on which kernels the model runs."""

    @abstractmethod
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (GuidedDecodingError for the grammar) for a request this engine cannot run.
        Cheap: it checks the grammar's bounds but compiles nothing (see `prepare_grammar`)."""

    def is_grammar_compiled(self, guided: GuidedDecoding) -> bool:
        """`prepare_grammar(guided)` would answer at once: compiled already, or known not to compile.
        An engine that compiles elsewhere (a remote one) has nothing to prepare."""
        return True

    async def prepare_grammar(self, guided: GuidedDecoding) -> None:
        """Compile `guided` off the event loop and the engine thread, within the compiler's limits, so
        that `generate` finds it compiled. GuidedDecodingError when it cannot be honoured
        (GrammarTooComplexError past the limits), GrammarCompilerBusyError when no compiler frees up
        in time. Cancelling it stops the compilation."""

    @abstractmethod
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 tenant: str = "", *, is_validated: bool = False) -> AsyncIterator[CompletionDelta]:
        """The request's deltas until every choice has finished; closing the iterator aborts the request.
        `is_validated`: the caller has had `validate` accept these very prompt and params, so they are
        not checked again. `tenant` names who asked, for fair scheduling between tenants. A grammar
        that is not compiled (never prepared, or dropped from the cache since) is compiled first, as
        `prepare_grammar` does."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop the request; its stream ends."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """How busy the engine is now (a recent snapshot: it never waits for the engine)."""

    # lifecycle

    @abstractmethod
    def start(self) -> None:
        pass

    @abstractmethod
    def shutdown(self) -> None:
        """Abort everything in flight and stop."""

    @abstractmethod
    def abort_all(self, reason: str) -> None:
        """Abort every request, queued or running; each stream fails with EngineStoppedError(reason).
        The engine keeps running."""
