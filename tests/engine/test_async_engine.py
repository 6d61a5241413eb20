"""The served engine's grammars: compiled in its workers, carried by each request, never compiled
by the engine thread, even when the cache has dropped them."""

import asyncio
import re

import pytest

from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.builder import prepare_model
from mistral_serve.engine.client import GrammarTooLargeError
from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.engine.grammar_bounds import MAX_REGEX_CHARS
from mistral_serve.engine.params import GuidedDecoding, SamplingParams
from tests.engine.helpers import ByteTokenizer
from tests.model.helpers import mistral_config, reference_and_ours

REGEX = "(yes|no|maybe) [0-9]!"


@pytest.fixture(scope="module")
def model():
    return prepare_model(reference_and_ours(mistral_config(vocab_size=ByteTokenizer.vocab_size))[1])


def served(model, **config) -> tuple[LLMEngine, AsyncEngine]:
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64, **config))
    runner = AsyncEngine(engine)
    runner.start()
    return engine, runner


async def generate(runner: AsyncEngine, guided: GuidedDecoding, seed: int) -> str:
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=20, guided=guided)
    return "".join([delta.text async for delta in runner.generate(list(b"Answer:"), params)])


def test_a_grammar_the_cache_dropped_is_compiled_again_in_a_worker_never_by_the_engine(model):
    engine, runner = served(model, max_grammar_cache_bytes=0)  # every grammar is dropped as soon as it is put
    guided = GuidedDecoding("regex", REGEX)

    async def scenario() -> list[str]:
        await runner.prepare_grammar(guided)
        assert not runner.is_grammar_compiled(guided)  # gone already
        return [await generate(runner, guided, seed) for seed in range(2)]

    try:
        texts = asyncio.run(scenario())
    finally:
        runner.shutdown()
    assert all(re.fullmatch(REGEX, text) for text in texts), texts
    assert engine.grammars.num_compilations == 0  # nothing compiled in this process
    assert runner.grammar_workers.num_compilations == 3  # prepared, then once for each request


def test_a_prepared_grammar_is_found_compiled_and_validating_compiles_nothing(model):
    engine, runner = served(model)
    guided = GuidedDecoding("regex", REGEX)
    params = SamplingParams(max_tokens=20, guided=guided)

    async def scenario() -> str:
        runner.validate(list(b"Answer:"), params)
        assert runner.grammar_workers.num_compilations == 0 and not runner.is_grammar_compiled(guided)
        await runner.prepare_grammar(guided)
        assert runner.is_grammar_compiled(guided)
        return await generate(runner, guided, seed=0)

    try:
        text = asyncio.run(scenario())
    finally:
        runner.shutdown()
    assert re.fullmatch(REGEX, text)
    assert runner.grammar_workers.num_compilations == 1 and engine.grammars.num_compilations == 0


def test_a_spec_past_a_bound_is_refused_before_any_worker_sees_it(model):
    _, runner = served(model)
    too_long = GuidedDecoding("regex", "a" * (MAX_REGEX_CHARS + 1))
    try:
        with pytest.raises(GrammarTooLargeError, match="max_regex_chars"):
            runner.validate(list(b"Answer:"), SamplingParams(guided=too_long))
        with pytest.raises(GrammarTooLargeError, match="max_regex_chars"):
            asyncio.run(runner.prepare_grammar(too_long))
    finally:
        runner.shutdown()
    assert runner.grammar_workers.num_compilations == 0 and runner.grammar_workers.num_workers_started == 0
