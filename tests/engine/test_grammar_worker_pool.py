"""Grammars compiled in worker processes: the same grammars as compiled in process, and a worker
that runs too long, needs too much memory or is no longer waited for is killed, while the pool
goes on. With Mistral's real v3 tokenizer: a large vocabulary is what makes a grammar slow."""

import asyncio
import json
from pathlib import Path
import time

import pytest
import torch

from mistral_serve.engine.client import GrammarCompilerBusyError, GrammarTooComplexError, GuidedDecodingError
from mistral_serve.engine.grammar_worker_pool import GrammarWorkerPool
from mistral_serve.engine.guided import (
    GrammarMatcher, allocate_token_bitmask, compile_guided, new_compiler, tokenizer_info,
)
from mistral_serve.engine.params import GuidedDecoding

# compiles for tens of seconds on a 32k vocabulary, though only 37 bytes long: what no bound sees
SLOW = GuidedDecoding.json_schema({"type": "string", "pattern": "^([a-z]{1,20}[0-9]{0,30}){1,50}$"})
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                          "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}}},
          "required": ["name", "age", "pets"]}


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped process is gone from /proc)."""
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def pool_of(tokenizer, **limits) -> GrammarWorkerPool:
    return GrammarWorkerPool(tokenizer, tokenizer.vocab_size, **limits)


@pytest.fixture(scope="module")
def pool(v3):
    pool = pool_of(v3)
    yield pool
    pool.close()


def masks(tokenizer, grammar, prefix: str) -> list[torch.Tensor]:
    """The token bitmask at the start and after each character of `prefix`."""
    matcher, bitmask, out = GrammarMatcher(grammar), allocate_token_bitmask(1, tokenizer.vocab_size), []
    for char in ["", *prefix]:
        assert matcher.accept_string(char) if char else True
        matcher.fill_next_token_bitmask(bitmask)
        out.append(bitmask.clone())
    return out


@pytest.mark.parametrize("max_recompile_cpu_s", [1e9, 0.0], ids=["compiled-again", "carried-over"])
def test_a_grammar_from_a_worker_allows_exactly_the_tokens_of_one_compiled_in_process(v3, max_recompile_cpu_s):
    guided = GuidedDecoding.json_schema(PERSON)
    pool = pool_of(v3, max_recompile_cpu_s=max_recompile_cpu_s)
    try:
        from_worker = asyncio.run(pool.compile(guided))
    finally:
        pool.close()
    in_process = compile_guided(new_compiler(tokenizer_info(v3.grammar_vocab(), v3.vocab_size, v3.eos_token_ids), 1),
                                guided)
    prefix = '{"name": "Ada", "age": 3'
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(masks(v3, from_worker, prefix),
                                                                 masks(v3, in_process, prefix)))
    matcher = GrammarMatcher(from_worker)
    assert matcher.accept_string(json.dumps({"name": "Ada", "age": 36, "pets": ["cat"]}))
    assert matcher.accept_token(min(v3.eos_token_ids))  # and it may end there
    assert pool.num_compilations == 1


def test_a_spec_that_cannot_compile_is_a_guided_decoding_error_not_a_limit(pool):
    with pytest.raises(GuidedDecodingError, match="widget") as error:
        asyncio.run(pool.compile(GuidedDecoding.json_schema({"type": "widget"})))
    assert not isinstance(error.value, GrammarTooComplexError)


def test_past_the_timeout_the_worker_is_killed_and_the_pool_goes_on(v3):
    pool = pool_of(v3, timeout_s=0.5)
    pool.warm_up()

    async def scenario():
        with pytest.raises(GrammarTooComplexError, match="compile_timeout_s") as error:
            await pool.compile(SLOW)
        assert error.value.code == "grammar_too_complex"
        return await pool.compile(GuidedDecoding.json_schema(PERSON))

    try:
        assert asyncio.run(scenario()) is not None
        assert pool.num_workers_started == 2  # the killed one was replaced
    finally:
        pool.close()


def test_past_the_memory_limit_it_is_too_complex(v3):
    pool = pool_of(v3, max_memory_bytes=8 << 20)
    enum = GuidedDecoding.json_schema({"enum": [f"value number {i} with a few more words" for i in range(5000)]})
    try:
        with pytest.raises(GrammarTooComplexError, match="max_compile_memory_bytes"):
            asyncio.run(pool.compile(enum))
    finally:
        pool.close()


def test_cancelling_a_compilation_kills_its_worker(pool):
    async def scenario():
        compiling = asyncio.ensure_future(pool.compile(SLOW))
        while pool.num_compiling == 0:
            assert not compiling.done()
            await asyncio.sleep(0.01)
        pids = pool.worker_pids
        compiling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await compiling
        return pids

    pids = asyncio.run(scenario())
    # killed, not left to finish its tens of seconds of compiling
    assert wait_until(lambda: any(not is_running(pid) for pid in pids), timeout_s=10)
    assert wait_until(lambda: pool.num_compiling == 0, timeout_s=10)


def test_a_compilation_cancelled_as_it_ends_never_kills_the_worker_another_one_gets(pool):
    """A caller cancelled just after its compilation came back must leave that worker alone: by then it
    may be compiling another caller's grammar."""
    async def scenario():
        for _ in range(20):
            task = asyncio.ensure_future(pool.compile(GuidedDecoding.json_schema(PERSON)))
            while not task.done() and pool.num_compiling == 0:
                await asyncio.sleep(0)
            while not task.done() and pool.num_compiling:
                await asyncio.sleep(0)
            task.cancel()  # at the moment the reply is being read back, or just after
            await asyncio.gather(task, return_exceptions=True)
            assert await pool.compile(GuidedDecoding.json_schema(PERSON)) is not None

    asyncio.run(scenario())


def test_a_compilation_waits_for_a_free_worker_only_so_long(v3):
    pool = pool_of(v3, num_workers=1, max_wait_s=0.2)

    async def scenario():
        compiling = asyncio.ensure_future(pool.compile(SLOW))
        while pool.num_compiling == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(GrammarCompilerBusyError):
            await pool.compile(GuidedDecoding.json_schema(PERSON))
        compiling.cancel()
        await asyncio.gather(compiling, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        pool.close()
