"""AsyncEngine: the LLMEngine's step loop on a background thread, seen from asyncio as streams.

Only the engine thread touches the LLMEngine. Callers hand it new requests and aborts through
a locked inbox; it hands deltas back to each caller's event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
import logging
import threading
import uuid

from mistral_serve.engine.engine import CompletionDelta, LLMEngine, StepError
from mistral_serve.engine.params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new_requests: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self.idle = threading.Event()  # set while the engine has nothing to do
        self.idle.set()

    def start(self) -> None:
        if self._thread is None:
            self._is_stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Abort everything in flight and stop the loop."""
        self._is_stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[CompletionDelta]:
        """Yield the request's deltas until every choice has finished.

        Closing or cancelling the iterator aborts the request and frees its blocks."""
        if self._is_stopping or self._thread is None:
            raise EngineStoppedError("the engine is not running")
        self.engine.validate(prompt_token_ids, params)  # bad input fails here, in the caller
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
            self._new_requests.append((request_id, list(prompt_token_ids), params))
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

    # the engine thread

    def _loop(self) -> None:
        while True:
            self._apply_inbox()
            if self._is_stopping:
                self._abort_all(EngineStoppedError("the engine was shut down"))
                return
            if not self.engine.has_unfinished_requests():
                self.idle.set()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.idle.clear()
            try:
                deltas = self.engine.step()
            except StepError as error:
                logger.exception("engine step failed for %d request(s)", len(error.request_ids))
                for request_id in error.request_ids:
                    self._close(request_id, error.cause)
                continue
            except Exception as error:  # a bug outside the model run: fail everyone, keep the loop up
                logger.exception("engine step failed")
                self._abort_all(error)
                continue
            self._publish(deltas)

    def _apply_inbox(self) -> None:
        with self._lock:
            new_requests, self._new_requests = self._new_requests, []
            aborts, self._aborts = self._aborts, []
        for request_id, prompt_token_ids, params in new_requests:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params)
            except ValueError as error:
                self._close(request_id, error)
        for request_id in aborts:
            self.engine.abort_request(request_id)
            self._close(request_id, None)

    def _publish(self, deltas: list[CompletionDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)
            if delta.is_request_finished:
                self._close(delta.request_id, None)

    def _close(self, request_id: str, error: BaseException | None) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None and error is not None:
            stream.put(error)

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
