"""AsyncEngine: the LLMEngine's step loop on a background thread, seen from asyncio as streams; the
in-process EngineClient.

Only the engine thread changes the LLMEngine. Callers hand it new requests and aborts through a
locked inbox; it hands deltas back to each caller's event loop with `call_soon_threadsafe`, and
publishes a snapshot of its stats after each step. Callers' threads only read what never changes
(the tokenizer, the context limit), validate requests, and read and fill the grammar cache (it is
thread-safe).

The engine thread never compiles a grammar: grammars are compiled in worker processes
(GrammarWorkerPool), awaited by the caller, and each request carries its compiled grammar into the
inbox, so the cache may drop it at any time without the engine thread noticing.

The loop runs on a thread of its own, or on a given one-thread executor: the server loads the
model on that executor's thread and runs the loop there too, so that all of a model's CPU work
comes from one thread. (Each thread that starts parallel CPU work gets its own OpenMP team; with
two teams on a small machine there are more OpenMP threads than cores, and OpenMP then stops
spinning between parallel regions: measured here, a decode step on 2 threads went from 13 to 21 ms.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
import logging
import threading
import time
import uuid

from mistral_serve.engine.builder import build_engine_on_its_thread
from mistral_serve.engine.client import (
    CompletionDelta, EngineBackend, EngineClient, EngineOverloadedError, EngineStats, EngineStoppedError,
    GrammarTooComplexError, GuidedDecodingError, QueueTimeoutError,
)
from mistral_serve.engine.engine import LLMEngine
from mistral_serve.engine.grammar_bounds import check_grammar_bounds
from mistral_serve.engine.grammar_worker_pool import GrammarWorkerPool
from mistral_serve.engine.guided import CompiledGrammar
from mistral_serve.engine.params import GuidedDecoding, SamplingParams
from mistral_serve.settings import Settings
from mistral_serve.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueLimits:
    """Bounds on the requests waiting for a place in the running batch (None: unbounded)."""

    max_queued_requests: int | None = None
    max_queued_prompt_tokens: int | None = None
    queue_timeout_s: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueLimits:
        return cls(settings.max_queued_requests, settings.max_queued_prompt_tokens, settings.queue_timeout_s)


def load_async_engine(settings: Settings, num_threads: int) -> AsyncEngine:
    """The engine of `settings.model`, loaded with `num_threads` CPU threads on a thread of its own
    that will also run its loop, and bounded by the settings' queue limits."""
    engine, engine_thread = build_engine_on_its_thread(settings, num_threads)
    grammar_workers = GrammarWorkerPool(engine.tokenizer, engine.grammars.vocab_size)
    grammar_workers.warm_up()  # the first schema a client sends finds a worker ready
    return AsyncEngine(engine, QueueLimits.from_settings(settings), runs_on=engine_thread,
                       grammar_workers=grammar_workers)


@dataclass
class _Queued:
    submitted_at: float
    num_prompt_tokens: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class AsyncEngine(EngineClient):
    def __init__(self, engine: LLMEngine, limits: QueueLimits = QueueLimits(), *,
                 runs_on: ThreadPoolExecutor | None = None, grammar_workers: GrammarWorkerPool | None = None):
        """`limits`: bounds on the requests waiting to start; `runs_on`: a one-thread executor to run
        the loop on (the thread that loaded the model), None: a thread of its own; `grammar_workers`:
        where grammars are compiled, None: a pool with the default limits, whose first worker starts
        when the first grammar needs it."""
        self._engine = engine
        self._limits = limits  # fixed at construction
        self._executor = runs_on
        self.grammar_workers = grammar_workers or GrammarWorkerPool(engine.tokenizer, engine.grammars.vocab_size)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new_requests: list[tuple[str, list[int], SamplingParams, str, CompiledGrammar | None]] = []
        self._queued: dict[str, _Queued] = {}  # submitted, not yet started: what the limits bound
        self._num_queued_prompt_tokens = 0
        self._aborts: list[str] = []
        self._abort_reason: str | None = None  # set by abort_all: what the aborted callers are told
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | Future | None = None  # the running loop
        self._is_stopping = False
        self._stats = self._read_stats()  # published by the engine thread after each change
        self.idle = threading.Event()  # set while the engine has nothing to do
        self.idle.set()

    # the client surface, for any thread

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        # prompt plus generated tokens, at most: configured, allowed by the positions, held by the cache
        return self._engine.max_model_len

    @property
    def backend(self) -> EngineBackend:
        return self._engine.backend  # fixed when the engine was built

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._engine.check(prompt_token_ids, params)  # reads only the engine's fixed facts; compiles nothing

    def is_grammar_compiled(self, guided: GuidedDecoding) -> bool:
        try:
            return self._engine.grammars.get(guided) is not None
        except GuidedDecodingError:  # known not to compile
            return True

    async def prepare_grammar(self, guided: GuidedDecoding) -> None:
        await self._grammar(guided)

    async def _grammar(self, guided: GuidedDecoding) -> CompiledGrammar:
        """From the cache, else compiled in a worker and cached; a failure that will recur is cached too."""
        grammars = self._engine.grammars
        grammar = grammars.get(guided)  # GuidedDecodingError for a spec known not to compile
        if grammar is not None:
            return grammar
        check_grammar_bounds(guided)  # the caller may not have validated it
        try:
            grammar = await self.grammar_workers.compile(guided)
        except GrammarTooComplexError:
            raise  # not remembered: a timeout depends on how busy the machine was
        except GuidedDecodingError as error:
            grammars.put_failure(guided, error)
            raise
        grammars.put(guided, grammar)
        return grammar

    def stats(self) -> EngineStats:
        return self._stats

    def start(self) -> None:
        if self._thread is None:
            if self._engine.driver is not None and self._engine.driver is not self:
                # two loops stepping one engine would sample one sequence twice per step
                raise RuntimeError("this engine is already run by another AsyncEngine; stop that one first")
            self._engine.driver = self
            self._is_stopping = False
            self.grammar_workers.open()
            if self._executor is not None:
                self._thread = self._executor.submit(self._loop)
            else:
                self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        """Abort everything in flight and stop the loop."""
        self._is_stopping = True
        self._wake.set()
        if isinstance(self._thread, Future):
            self._thread.result()
        elif self._thread is not None:
            self._thread.join()
        self._thread = None
        if self._engine.driver is self:
            self._engine.driver = None
        self.grammar_workers.close()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       tenant: str = "", *, is_validated: bool = False) -> AsyncIterator[CompletionDelta]:
        """Yield the request's deltas until every choice has finished. Raises EngineOverloadedError at
        once when the queue is full, QueueTimeoutError when the request waited too long to start.

        Closing or cancelling the iterator aborts the request and frees its blocks."""
        if self._is_stopping or self._thread is None:
            raise EngineStoppedError("the engine is not running")
        if not is_validated:
            self.validate(prompt_token_ids, params)  # bad input fails here, in the caller
        # the request holds its grammar from here on: the cache may drop it before the request starts
        grammar = None if params.guided is None else await self._grammar(params.guided)
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._check_queue_room(len(prompt_token_ids))
            self._streams[request_id] = stream
            self._queued[request_id] = _Queued(time.monotonic(), len(prompt_token_ids))
            self._num_queued_prompt_tokens += len(prompt_token_ids)
            self._new_requests.append((request_id, list(prompt_token_ids), params, tenant, grammar))
        self._wake.set()
        is_finished = False
        try:
            while not is_finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    is_finished = True
                    raise item
                is_finished = item.is_request_finished
                yield item
        finally:
            if not is_finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def abort_all(self, reason: str) -> None:
        with self._lock:
            self._aborts.extend(self._streams)
            self._abort_reason = reason
        self._wake.set()

    def _check_queue_room(self, num_prompt_tokens: int) -> None:
        limits = self._limits
        if limits.max_queued_requests is not None and len(self._queued) >= limits.max_queued_requests:
            raise EngineOverloadedError(f"{len(self._queued)} requests are already waiting for this model")
        if (limits.max_queued_prompt_tokens is not None and self._queued
                and self._num_queued_prompt_tokens + num_prompt_tokens > limits.max_queued_prompt_tokens):
            raise EngineOverloadedError(f"{self._num_queued_prompt_tokens} prompt tokens are already waiting "
                                        "for this model")

    def _unqueue(self, request_id: str) -> None:
        """The request started, ended or was dropped: it no longer counts against the queue (lock held)."""
        queued = self._queued.pop(request_id, None)
        if queued is not None:
            self._num_queued_prompt_tokens -= queued.num_prompt_tokens

    # the engine thread

    def _loop(self) -> None:
        while True:
            try:
                if self._run_once():
                    return
            except Exception as error:  # a bug outside the model run: fail everyone, keep the loop up
                logger.exception("engine loop failed")
                self._abort_all(error)

    def _run_once(self) -> bool:
        """Take in new requests and aborts, then run one step; True once the engine is shut down."""
        self._apply_inbox()
        if self._is_stopping:
            self._abort_all(EngineStoppedError("the engine was shut down"))
            return True
        if not self._engine.has_unfinished_requests():
            self._stats = self._read_stats()
            self.idle.set()
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return False
        self.idle.clear()
        self._update_queue()
        self._publish(self._engine.step())
        self._stats = self._read_stats()
        return False

    def _apply_inbox(self) -> None:
        with self._lock:
            new_requests, self._new_requests = self._new_requests, []
            aborts, self._aborts = self._aborts, []
            reason, self._abort_reason = self._abort_reason, None
        for request_id, prompt_token_ids, params, tenant, grammar in new_requests:
            try:
                # generate() validated it and brought its grammar, compiled: nothing is compiled here
                self._engine.add_request(request_id, prompt_token_ids, params, tenant, is_validated=True,
                                         grammar=grammar)
            except ValueError as error:
                self._close(request_id, error)
            except Exception as error:  # a bug: this request fails, the loop and the others go on
                logger.exception("could not add request %s", request_id)
                self._close(request_id, error)
        for request_id in aborts:
            self._engine.abort_request(request_id)
            self._close(request_id, EngineStoppedError(reason) if reason else None)

    def _update_queue(self) -> None:
        """Forget queued requests that have started; drop those that waited past the queue timeout."""
        timeout_s = self._limits.queue_timeout_s
        now = time.monotonic()
        with self._lock:
            queued = list(self._queued.items())
        for request_id, entry in queued:
            if self._engine.is_request_started(request_id):
                with self._lock:
                    self._unqueue(request_id)
            elif timeout_s is not None and now - entry.submitted_at > timeout_s:
                self._engine.abort_request(request_id)
                self._close(request_id, QueueTimeoutError(
                    f"the request waited {now - entry.submitted_at:.0f} s for a place, longer than the "
                    f"queue timeout of {timeout_s:g} s"))

    def _publish(self, deltas: list[CompletionDelta]) -> None:
        for delta in deltas:
            if delta.error is not None:  # the model run failed for this request alone
                self._close(delta.request_id, delta.error)
                continue
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)
            if delta.is_request_finished:
                self._close(delta.request_id, None)

    def _close(self, request_id: str, error: BaseException | None) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            self._unqueue(request_id)
        if stream is not None and error is not None:
            stream.put(error)

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self._engine.requests):
            self._engine.abort_request(request_id)
        with self._lock:
            streams, self._streams = self._streams, {}
            self._queued.clear()
            self._num_queued_prompt_tokens = 0
        for stream in streams.values():
            stream.put(error)
        self._stats = self._read_stats()

    def _read_stats(self) -> EngineStats:
        engine = self._engine
        return EngineStats(engine.num_running, engine.num_waiting, engine.num_kv_blocks_used,
                           engine.num_kv_blocks_total, engine.num_prefix_cache_queries, engine.num_prefix_cache_hits)
