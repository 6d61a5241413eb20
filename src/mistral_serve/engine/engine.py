"""LLMEngine: requests in, text deltas out, one `step()` at a time.

`step()` = schedule → run → postprocess. Everything here is synchronous and single-threaded;
`AsyncEngine` (async_engine.py) drives it from a background thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import logging

from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.client import CompletionDelta, EngineBackend, SampledLogprob
from mistral_serve.engine.grammar_bounds import MAX_GRAMMAR_CACHE_BYTES, check_grammar_bounds
from mistral_serve.engine.grammar_cache import GrammarCompilerCache
from mistral_serve.engine.guided import CompiledGrammar, GrammarMatcher, check_schema_support
from mistral_serve.engine.params import SamplingParams
from mistral_serve.engine.runner import ModelRunner, kv_cache_bytes_per_block
from mistral_serve.engine.scheduler import ScheduledSequence, Scheduler
from mistral_serve.engine.sequence import Sequence, SequenceFinish, SequenceStatus
from mistral_serve.engine.text_stream import TextStream
from mistral_serve.model.prepared import PreparedModel
from mistral_serve.model.sampler import SampledToken
from mistral_serve.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step; long prompts are prefilled in chunks of this size
    max_model_len: int | None = None  # None: the checkpoint's context length
    kv_cache_memory: int = 1 << 30  # bytes for the KV cache
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set
    enable_prefix_caching: bool = True
    seed: int | None = None  # for requests without a seed
    max_grammar_cache_bytes: int = MAX_GRAMMAR_CACHE_BYTES  # compiled grammars kept, by their own sizes

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")


@dataclass
class _Request:
    seqs: list[Sequence]
    streams: dict[int, TextStream] = field(default_factory=dict)  # by seq_id

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    def __init__(self, prepared: PreparedModel, tokenizer, config: EngineConfig = EngineConfig()):
        """`prepared`: a model as `prepare_for_inference` returns it (engine/builder.py loads and prepares)."""
        self.prepared = prepared
        self.model = prepared.model
        self.tokenizer = tokenizer
        # the AsyncEngine whose loop runs the steps: one at a time, since steps are not thread-safe
        self.driver: object | None = None
        self.config = config
        model_config = prepared.config
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_memory // kv_cache_bytes_per_block(model_config, config.block_size, prepared.dtype))
        # prompt plus generated tokens, at most: what was configured, what the model's positions allow,
        # and what the cache holds (a sequence may never need more blocks than exist, or it could not
        # run even alone)
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, num_blocks * config.block_size)
        eos = frozenset(tokenizer.eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens, eos_token_ids=eos)
        self.runner = ModelRunner(prepared, num_blocks=num_blocks, block_size=config.block_size,
                                  eos_token_ids=eos, seed=config.seed)
        self.grammars = GrammarCompilerCache(tokenizer, model_config.vocab_size,
                                             max_bytes=config.max_grammar_cache_bytes)
        self.backend = EngineBackend(device=str(prepared.device), dtype=str(prepared.dtype).removeprefix("torch."),
                                     kernels=prepared.kernels, kernel_path=prepared.kernel_path)
        self.requests: dict[str, _Request] = {}

    # requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, changing nothing, for a request this engine cannot run. Compiles the
        request's grammar here, once per spec (a served engine compiles in its grammar workers, and
        only `check`s here)."""
        self.check(prompt_token_ids, params)
        if params.guided is not None:
            self.grammars.compile(params.guided)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """`validate` without compiling: cheap, whatever the request."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.model.config.vocab_size
        if any(not 0 <= t < vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds "
                             f"{self.max_model_len}, with room for at least one generated token")
        bad_ids = [t for t in [*params.logit_bias, *params.stop_token_ids] if t >= vocab_size]
        if bad_ids:
            raise ValueError(f"token id {bad_ids[0]} is out of the vocabulary (size {vocab_size})")
        if params.guided is not None:  # GuidedDecodingError
            check_grammar_bounds(params.guided)
            check_schema_support(params.guided.schema)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    tenant: str = "", *, is_validated: bool = False, grammar: CompiledGrammar | None = None) -> None:
        """Queue a request. `tenant` names who asked: waiting requests are admitted fairly between
        tenants, so one that sends many cannot starve the others. `is_validated`: `validate` has
        accepted this prompt and params already. `grammar`: the request's compiled grammar, brought
        along (a served engine's are compiled off this thread); None: compiled here if not cached."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not is_validated:
            self.validate(prompt_token_ids, params)
        if params.guided is not None and grammar is None:
            grammar = self.grammars.compile(params.guided)
        leader = None
        seqs = []
        for index in range(params.n):
            seq = Sequence(request_id, index, prompt_token_ids, params, self.max_model_len, leader=leader,
                           tenant=tenant)
            leader = leader or seq
            seqs.append(seq)
        request = _Request(seqs)
        for seq in seqs:
            request.streams[seq.seq_id] = TextStream(self._detokenizer(), params.stop)
            if grammar is not None:  # each choice its own matcher
                self.runner.add_matcher(seq, GrammarMatcher(grammar))
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def _detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer)

    def abort_request(self, request_id: str) -> list[CompletionDelta]:
        """Stop the request now and free its blocks; returns the final delta of each open choice."""
        request = self.requests.get(request_id)
        if request is None:
            return []
        deltas = []
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceFinish.ABORT)
                deltas.append(self._delta(seq, "", (), None))
        return self._mark_finished_requests(deltas) if deltas else []

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def is_request_started(self, request_id: str) -> bool:
        """The request has left the waiting queue (it may be running, preempted or over)."""
        request = self.requests.get(request_id)
        return request is None or any(seq.status is not SequenceStatus.WAITING or seq.num_preemptions
                                      for seq in request.seqs)

    # the step

    def step(self) -> list[CompletionDelta]:
        batch = self.scheduler.schedule()
        try:
            sampled = self.runner.run(batch)
            failures = {}
        except Exception as error:
            sampled, failures = self._run_apart(batch, error)
        failed = [replace(delta, error=error) for request_id, error in failures.items()
                  for delta in self.abort_request(request_id)]
        self.scheduler.postprocess(batch, [s.token_id if s else None for s in sampled])
        deltas = [self._on_token(item.seq, token) for item, token in zip(batch, sampled)
                  if token is not None and item.seq.request_id in self.requests]
        return failed + self._mark_finished_requests(deltas)

    def _run_apart(self, batch: list[ScheduledSequence], batch_error: Exception
                   ) -> tuple[list[SampledToken | None], dict[str, Exception]]:
        """The model run failed for the whole batch: run each request's part of it alone, so that
        only a request that fails by itself is failed and the others go on. Re-running is safe: it
        writes the same KV slots again, and a failed run restores the sampling state it touched.
        Returns the batch's sampled tokens and each failed request's error."""
        parts: dict[str, list[int]] = {}
        for i, item in enumerate(batch):
            parts.setdefault(item.seq.request_id, []).append(i)
        sampled: list[SampledToken | None] = [None] * len(batch)
        if len(parts) == 1:
            logger.error("the model run failed for request %s", *parts, exc_info=batch_error)
            return sampled, {request_id: batch_error for request_id in parts}
        logger.warning("the model run failed for a batch of %d requests (%r); running them one by one",
                       len(parts), batch_error)
        failures = {}
        for request_id, indices in parts.items():
            try:
                tokens = self.runner.run([batch[i] for i in indices])
            except Exception as error:
                logger.error("the model run failed for request %s", request_id, exc_info=error)
                failures[request_id] = error
                continue
            for i, token in zip(indices, tokens):
                sampled[i] = token
        return sampled, failures

    def _mark_finished_requests(self, deltas: list[CompletionDelta]) -> list[CompletionDelta]:
        """Flag the last delta of each request that is now over, and forget that request."""
        last_index = {delta.request_id: i for i, delta in enumerate(deltas)}
        for request_id, i in last_index.items():
            if self.requests[request_id].is_finished:
                deltas[i] = replace(deltas[i], is_request_finished=True)
                del self.requests[request_id]
        return deltas

    def _on_token(self, seq: Sequence, token: SampledToken) -> CompletionDelta:
        request = self.requests[seq.request_id]
        stream = request.streams[seq.seq_id]
        text = stream.push(token.token_id)
        if stream.is_stopped and not seq.is_finished:
            self.scheduler.finish(seq, SequenceFinish.STOP)
        if self.runner.is_grammar_terminated(seq) and not seq.is_finished:  # EOS with ignore_eos
            self.scheduler.finish(seq, SequenceFinish.STOP)
        if seq.is_finished:
            text += stream.finish()
        logprobs = None
        if seq.params.logprobs:
            logprobs = (SampledLogprob(token.token_id, token.logprob, token.top_logprobs),)
        return self._delta(seq, text, (token.token_id,), logprobs)

    def _delta(self, seq: Sequence, text: str, token_ids, logprobs) -> CompletionDelta:
        if seq.is_finished:
            self.runner.release(seq)
        return CompletionDelta(
            request_id=seq.request_id, index=seq.index, text=text, token_ids=tuple(token_ids),
            logprobs=logprobs if seq.params.logprobs else None,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens)

    # state, for metrics and tests

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_kv_blocks_total(self) -> int:
        return self.block_manager.num_blocks

    @property
    def num_kv_blocks_used(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def num_prefix_cache_queries(self) -> int:
        return self.scheduler.num_prefix_cache_queries

    @property
    def num_prefix_cache_hits(self) -> int:
        return self.scheduler.num_prefix_cache_hits
