"""GrammarWorkerPool: grammars compiled in worker processes, off the serving process, bounded in time,
memory and number, and stopped as soon as nobody waits for them any more.

A worker (grammar_worker.py) gets the vocabulary once, when it starts (a couple of seconds: it
imports the grammar engine), then compiles one spec at a time. The pool keeps up to
`num_workers` of them; that is also how many compilations run at once, and a compilation waits at
most `max_wait_s` for a free one. A worker that goes past `timeout_s`, or whose caller is
cancelled (its HTTP client left), is killed at once and replaced in the background, so one stays
warm.

What a worker compiled comes back one of two ways (see grammar_bounds.MAX_RECOMPILE_CPU_S): a
cheap grammar is compiled again here, a costly one is carried over serialised and read back. Both
happen on one loader thread of lower priority, with the GIL released, so they take neither the
event loop nor much of the engine's CPU.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
import json
import logging
import os
from pathlib import Path
import subprocess
import sys
import threading
import time

import mistral_serve
from mistral_serve.engine.client import GrammarCompilerBusyError, GrammarTooComplexError, GuidedDecodingError
from mistral_serve.engine.grammar_bounds import (
    COMPILE_TIMEOUT_S, GRAMMAR_NICENESS, MAX_COMPILE_MEMORY_BYTES, MAX_COMPILE_WAIT_S, MAX_RECOMPILE_CPU_S,
    NUM_GRAMMAR_WORKERS,
)
from mistral_serve.engine.grammar_worker import pack_vocab, read_frame, write_frame
from mistral_serve.engine.guided import KIND_NAMES, CompiledGrammar, compile_guided, new_compiler, tokenizer_info
from mistral_serve.engine.params import GuidedDecoding

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 60.0  # importing the grammar engine takes seconds, more on a loaded machine


class GrammarWorkerPool:
    """Compiles the grammars of one tokenizer and model vocabulary in worker processes."""

    def __init__(self, tokenizer, vocab_size: int, *, num_workers: int = NUM_GRAMMAR_WORKERS,
                 timeout_s: float = COMPILE_TIMEOUT_S, max_memory_bytes: int = MAX_COMPILE_MEMORY_BYTES,
                 max_wait_s: float = MAX_COMPILE_WAIT_S, max_recompile_cpu_s: float = MAX_RECOMPILE_CPU_S,
                 niceness: int = GRAMMAR_NICENESS):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: the width of its logits
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_memory_bytes = max_memory_bytes
        self.max_wait_s = max_wait_s
        self.max_recompile_cpu_s = max_recompile_cpu_s
        self.niceness = niceness
        self.num_compilations = 0  # specs sent to a worker
        self.num_workers_started = 0
        self._lock = threading.Condition()  # notified when a worker is given back or a warm-up ends
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()  # idle or busy
        self._num_warming = 0  # being started in the background
        self._num_compiling = 0
        self._slots = _Slots(num_workers)
        self._io = ThreadPoolExecutor(num_workers + 1, thread_name_prefix="grammar-io")  # + a warm-up
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="grammar-loader",
                                          initializer=_lower_this_threads_priority, initargs=(niceness,))
        self._settings: bytes | None = None
        self._vocab: bytes | None = None  # packed, for starting workers
        self._info = None  # the loader thread's, for reading back what a worker found costly
        self._compiler = None  # the loader thread's, for compiling again what a worker found cheap
        self._is_closed = False

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the running workers, idle or busy."""
        with self._lock:
            return sorted(worker.process.pid for worker in self._live)

    @property
    def num_compiling(self) -> int:
        """Specs a worker is compiling now."""
        return self._num_compiling

    def warm_up(self) -> None:
        """Start a worker in the background, so that the first compilation finds one ready."""
        self._io.submit(self._keep_one_warm)

    async def compile(self, guided: GuidedDecoding) -> CompiledGrammar:
        """The compiled grammar. GuidedDecodingError when it cannot be honoured, GrammarTooComplexError
        past the time or memory limit, GrammarCompilerBusyError when no worker frees up within
        `max_wait_s`. Cancelled, it kills the worker compiling it."""
        if not await self._slots.acquire(self.max_wait_s):
            raise GrammarCompilerBusyError(f"{self.num_workers} grammars are being compiled for this model; none "
                                           f"finished within {self.max_wait_s:g} s")
        job = _Job()
        running = self._io.submit(self._run, job, guided)
        running.add_done_callback(lambda _: self._slots.release())  # once the worker is free, or dead
        try:
            reply, grammar_json = await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            job.cancel()  # nobody waits for it any more: kill its worker now
            raise
        if reply["status"] == "invalid":
            raise GuidedDecodingError(reply["message"])
        if reply["status"] == "out_of_memory":
            raise self._too_complex(guided, f"needed more than {self.max_memory_bytes >> 20} MiB of memory, the "
                                            "limit (max_compile_memory_bytes)")
        return await asyncio.wrap_future(self._loader.submit(self._load, guided, grammar_json))

    def close(self) -> None:
        """Kill every worker; compilations in progress fail with GrammarCompilerBusyError, and so do new
        ones until `open`."""
        with self._lock:
            self._is_closed = True
            workers, self._idle = list(self._live), []
            self._live.clear()
        for worker in workers:
            worker.stop()

    def open(self) -> None:
        """Compile again after `close` (a pool starts open); workers start as they are needed."""
        with self._lock:
            self._is_closed = False

    # the io threads: one compilation each, start to reply

    def _run(self, job: _Job, guided: GuidedDecoding) -> tuple[dict, bytes | None]:
        worker = self._take_worker()
        if not job.attach(worker):  # cancelled while a worker was found: it is still a good one
            self._give_back(worker)
            raise asyncio.CancelledError
        with self._lock:
            self.num_compilations += 1
            self._num_compiling += 1
        try:
            reply, grammar_json = worker.compile(guided, self.timeout_s)
        except TimeoutError:
            logger.warning("grammar worker %d killed: a %s compiled for longer than %g s", worker.process.pid,
                           KIND_NAMES[guided.kind], self.timeout_s)
            self._retire(worker)
            raise self._too_complex(guided, f"took longer than {self.timeout_s:g} s, the limit "
                                            "(compile_timeout_s)") from None
        except (EOFError, OSError, ValueError):  # killed (its caller left, or the pool closed), or it died
            self._retire(worker)
            if job.is_cancelled:
                raise asyncio.CancelledError from None
            if self._is_closed:
                raise GrammarCompilerBusyError("the grammar compiler was shut down") from None
            raise self._too_complex(guided, "stopped the grammar compiler (out of memory, the limit being "
                                            f"{self.max_memory_bytes >> 20} MiB, or a crash)") from None
        finally:
            with self._lock:
                self._num_compiling -= 1
        # from here a cancellation leaves the worker alone; one that came first has killed it
        if job.detach() or reply["status"] == "out_of_memory":  # after one, its heap may be near its cap
            self._retire(worker)
        else:
            self._give_back(worker)
        return reply, grammar_json

    def _take_worker(self) -> _Worker:
        """An idle worker; else the one being warmed up, once it is ready; else a new one."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        with self._lock:
            while not self._idle and self._num_warming and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            if self._idle:
                return self._idle.pop()
        return self._start_worker()

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._is_closed and worker in self._live:
                self._idle.append(worker)
                self._lock.notify_all()
                return
        worker.stop()

    def _retire(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            self._live.discard(worker)
            is_closed = self._is_closed
        if not is_closed:
            self._io.submit(self._keep_one_warm)

    def _keep_one_warm(self) -> None:
        with self._lock:
            if self._idle or self._num_warming or len(self._live) >= self.num_workers or self._is_closed:
                return
            self._num_warming += 1
        try:
            self._give_back(self._start_worker())
        except GrammarCompilerBusyError:  # closed meanwhile, or it could not start (and said why)
            pass
        finally:
            with self._lock:
                self._num_warming -= 1
                self._lock.notify_all()

    def _start_worker(self) -> _Worker:
        settings, vocab = self._init_frames()
        with self._lock:
            if self._is_closed:
                raise GrammarCompilerBusyError("the grammar compiler is shut down")
        try:
            worker = _Worker.start(settings, vocab)
        except (OSError, EOFError, TimeoutError, ValueError) as error:
            logger.error("a grammar worker did not start: %r", error)
            raise GrammarCompilerBusyError("no grammar compiler could start") from None
        with self._lock:
            self._live.add(worker)
            self.num_workers_started += 1
            is_closed = self._is_closed
        if is_closed:
            worker.stop()
            raise GrammarCompilerBusyError("the grammar compiler is shut down")
        return worker

    def _init_frames(self) -> tuple[bytes, bytes]:
        with self._lock:
            if self._vocab is None:
                self._vocab = pack_vocab(self.tokenizer.grammar_vocab())
                self._settings = json.dumps({
                    "vocab_size": self.vocab_size, "stop_token_ids": sorted(self.tokenizer.eos_token_ids),
                    "niceness": self.niceness, "max_memory_bytes": self.max_memory_bytes,
                    "max_recompile_cpu_s": self.max_recompile_cpu_s}).encode()
            return self._settings, self._vocab

    def _too_complex(self, guided: GuidedDecoding, what: str) -> GrammarTooComplexError:
        return GrammarTooComplexError(f"compiling this {KIND_NAMES[guided.kind]} {what}; make it simpler")

    # the loader thread

    def _load(self, guided: GuidedDecoding, grammar_json: bytes | None) -> CompiledGrammar:
        if self._compiler is None:
            self._info = tokenizer_info(self.tokenizer.grammar_vocab(), self.vocab_size, self.tokenizer.eos_token_ids)
            self._compiler = new_compiler(self._info, max_threads=1)
        if grammar_json is not None:  # costly to compile: read back what the worker made
            return CompiledGrammar.deserialize_json(grammar_json.decode(), self._info)
        return compile_guided(self._compiler, guided)  # its worker did it in under max_recompile_cpu_s


class _Worker:
    """One worker process, spoken to from one io thread at a time (and killed from any)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls, settings: bytes, vocab: bytes) -> _Worker:
        package_root = str(Path(mistral_serve.__file__).resolve().parent.parent)
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                             os.environ.get("PYTHONPATH")])),
                   "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # one compiling thread: few arenas to map
        process = subprocess.Popen([sys.executable, "-m", "mistral_serve.engine.grammar_worker"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environ, bufsize=0)
        worker = cls(process)
        try:
            write_frame(process.stdin.fileno(), settings)
            write_frame(process.stdin.fileno(), vocab)
            json.loads(read_frame(process.stdout.fileno(), time.monotonic() + WORKER_START_TIMEOUT_S))
        except BaseException:
            worker.stop()
            raise
        logger.info("grammar worker %d started", process.pid)
        return worker

    def compile(self, guided: GuidedDecoding, timeout_s: float) -> tuple[dict, bytes | None]:
        deadline = time.monotonic() + timeout_s
        write_frame(self.process.stdin.fileno(), json.dumps({"kind": guided.kind, "spec": guided.spec}).encode())
        reply = json.loads(read_frame(self.process.stdout.fileno(), deadline))
        grammar_json = read_frame(self.process.stdout.fileno(), deadline) if reply.get("is_carried") else None
        return reply, grammar_json

    def kill(self) -> None:
        """Kill the process, without waiting for it (from the event loop too): its pipes close, so the
        thread reading them gets EOF, and stops it."""
        self.process.kill()

    def stop(self) -> None:
        """Kill the process and reap it."""
        self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a kill cannot be refused: only a stuck kernel gets here
            logger.error("grammar worker %d did not exit after SIGKILL", self.process.pid)


class _Job:
    """One compilation's claim on its worker, which a cancellation can take back from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self.is_cancelled = False

    def attach(self, worker: _Worker) -> bool:
        """False when the job was cancelled already (the worker is then not the job's)."""
        with self._lock:
            if self.is_cancelled:
                return False
            self._worker = worker
            return True

    def detach(self) -> bool:
        """The job is done with its worker; True when it was cancelled before (and killed the worker)."""
        with self._lock:
            self._worker = None
            return self.is_cancelled

    def cancel(self) -> None:
        with self._lock:
            self.is_cancelled = True
            worker = self._worker
        if worker is not None:
            worker.kill()


class _Slots:
    """A counting semaphore that asyncio tasks of any event loop wait on, each for a bounded time."""

    def __init__(self, num_slots: int):
        self._num_free = num_slots
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._lock = threading.Lock()

    async def acquire(self, timeout_s: float) -> bool:
        """Take a slot; False when none came free within `timeout_s`."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._num_free and not self._waiters:
                self._num_free -= 1
                return True
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter[1]), timeout_s)
        except BaseException as error:  # timed out, or cancelled
            with self._lock:
                is_granted = waiter not in self._waiters
                if not is_granted:
                    self._waiters.remove(waiter)
            if is_granted:  # handed a slot just as it gave up: pass it on
                self.release()
            if isinstance(error, TimeoutError):
                return False
            raise
        return True

    def release(self) -> None:
        """From any thread."""
        with self._lock:
            while self._waiters:
                loop, future = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(_grant, future)
                    return
                except RuntimeError:  # its loop is closed: nobody waits there any more
                    continue
            self._num_free += 1


def _grant(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _lower_this_threads_priority(niceness: int) -> None:
    """On Linux each thread has a niceness of its own: lower this one's alone."""
    if sys.platform != "linux":
        return
    thread_id = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, os.getpriority(os.PRIO_PROCESS, thread_id) + niceness))
    except OSError:
        pass  # not allowed here: the thread keeps the process's priority
