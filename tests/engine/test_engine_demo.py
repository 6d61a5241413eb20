"""The engine end to end on the demo model (SmolLM2-135M-Instruct, a real instruct model)."""

import asyncio
import random

import pytest
import torch

from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.builder import load_engine
from mistral_serve.engine.engine import EngineConfig
from mistral_serve.engine.params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
]


@pytest.fixture(scope="module")
def engine(demo_path):
    return load_engine(str(demo_path), config=EngineConfig(
        max_num_seqs=32, max_num_batched_tokens=256, kv_cache_memory=256 << 20, seed=1234))


@pytest.fixture(scope="module")
def async_engine(engine):
    runner = AsyncEngine(engine)
    runner.start()
    yield runner
    runner.shutdown()


def prompt(engine, question):
    return engine.tokenizer.encode_chat([{"role": "user", "content": question}])


async def gather_deltas(async_engine, prompt_ids, params, delay=0.0, request_id=None):
    await asyncio.sleep(delay)
    return [delta async for delta in async_engine.generate(prompt_ids, params, request_id=request_id)]


def run_alone(async_engine, prompt_ids, params):
    """(text, token ids, finish reason) of one request with nothing else running."""
    deltas = asyncio.run(gather_deltas(async_engine, prompt_ids, params))
    reasons = [d.finish_reason for d in deltas if d.finish_reason]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], reasons[-1]


def text_and_tokens(deltas):
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]


def test_demo_model_knows_the_capital_of_france(engine, async_engine):
    text, _, reason = run_alone(async_engine, prompt(engine, QUESTIONS[0]), SamplingParams(temperature=0, max_tokens=40))
    assert "Paris" in text
    assert reason in ("stop", "length")


def test_greedy_tokens_match_transformers_on_the_same_gguf(engine, async_engine, demo_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        demo_path.parent, gguf_file=demo_path.name, dtype=torch.float32).eval()
    eos = engine.tokenizer.eos_token_ids
    for question in QUESTIONS:
        ids = prompt(engine, question)
        _, ours, _ = run_alone(async_engine, ids, SamplingParams(temperature=0, max_tokens=32))
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                           eos_token_id=sorted(eos))[0, len(ids):].tolist()
        expected = []
        for token in generated:  # up to and including the first end-of-sequence token
            expected.append(token)
            if token in eos:
                break
        assert ours == expected, question


def collect(async_engine, prompt_ids, params, delay=0.0):
    async def go():
        return text_and_tokens(await gather_deltas(async_engine, prompt_ids, params, delay))
    return go()


def test_staggered_concurrent_greedy_requests_equal_each_request_alone(engine, async_engine):
    rng = random.Random(0)
    prompts = [prompt(engine, f"{rng.choice(QUESTIONS)} Answer number {i}.") for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [run_alone(async_engine, p, params)[1] for p in prompts]

    async def together():
        return await asyncio.gather(*(collect(async_engine, p, params, delay=0.05 * i)
                                      for i, p in enumerate(prompts)))
    results = asyncio.run(together())
    assert [tokens for _, tokens in results] == alone
    assert engine.num_kv_blocks_used == 0


def test_a_seeded_sampled_request_gives_the_same_text_alone_and_under_load(engine, async_engine):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=24)
    ids = prompt(engine, "Tell me a short story about a fox.")
    alone = asyncio.run(collect(async_engine, ids, seeded))

    async def under_load():
        noise = [collect(async_engine, prompt(engine, q), SamplingParams(temperature=1.0, max_tokens=30))
                 for q in QUESTIONS * 2]
        results = await asyncio.gather(collect(async_engine, ids, seeded, delay=0.1), *noise)
        return results[0]
    assert asyncio.run(under_load()) == alone
    other_seed = asyncio.run(collect(async_engine, ids, SamplingParams(temperature=1.0, top_p=0.95, seed=7,
                                                                         max_tokens=24)))
    assert other_seed != alone


def test_every_block_is_free_after_finishing_aborting_and_cancelling(engine, async_engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def scenario():
        finished = asyncio.create_task(collect(async_engine, prompt(engine, QUESTIONS[1]),
                                               SamplingParams(temperature=0, max_tokens=5)))
        # cancelled mid-stream: the consumer stops after a few deltas
        stream = async_engine.generate(prompt(engine, QUESTIONS[2]), params)
        count = 0
        async for _ in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()
        # aborted from outside while streaming
        aborted_stream = async_engine.generate(prompt(engine, QUESTIONS[3]), params, request_id="to-abort")
        first = await aborted_stream.__anext__()
        async_engine.abort("to-abort")
        # a task cancelled while it waits
        cancelled = asyncio.create_task(collect(async_engine, prompt(engine, QUESTIONS[0]), params))
        await asyncio.sleep(0.3)
        cancelled.cancel()
        await finished
        return first
    first = asyncio.run(scenario())
    assert first.token_ids
    for _ in range(100):
        if engine.num_kv_blocks_used == 0 and not engine.has_unfinished_requests():
            break
        async_engine.idle.wait(0.1)
        asyncio.run(asyncio.sleep(0.05))
    assert engine.num_kv_blocks_used == 0
    assert not engine.has_unfinished_requests()


def test_stop_strings_are_cut_even_across_tokens_and_not_returned(engine, async_engine):
    ids = prompt(engine, "Count from 1 to 20, separated by commas.")
    full, _, _ = run_alone(async_engine, ids, SamplingParams(temperature=0, max_tokens=60))
    assert "5" in full
    stop = full[full.index("5"):full.index("5") + 3]  # likely spans more than one token
    text, _, reason = run_alone(async_engine, ids, SamplingParams(temperature=0, max_tokens=60, stop=(stop,)))
    assert reason == "stop"
    assert text == full[:full.index(stop)]


def test_n_choices_share_the_prompt_blocks_and_report_cached_tokens(engine, async_engine):
    ids = prompt(engine, "Name a colour. " * 10)
    deltas = asyncio.run(gather_deltas(async_engine, ids, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8)))
    cached, texts = {}, {0: "", 1: "", 2: ""}
    for delta in deltas:
        cached[delta.index] = delta.num_cached_tokens
        texts[delta.index] += delta.text
    block_size = engine.config.block_size
    assert cached[0] == 0 or cached[0] >= block_size  # the leader may hit earlier tests' cache
    assert cached[1] >= (len(ids) - 1) // block_size * block_size
    assert cached[2] >= (len(ids) - 1) // block_size * block_size
    assert len(set(texts.values())) > 1  # different seeds per choice
    assert engine.num_kv_blocks_used == 0


def test_logprobs_are_reported_for_each_token(engine, async_engine):
    ids = prompt(engine, QUESTIONS[0])
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    entries = [entry for delta in asyncio.run(gather_deltas(async_engine, ids, params)) for entry in delta.logprobs]
    assert len(entries) == 4
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0][0] == entry.token_id  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0][1])
        assert entry.logprob <= 0


def test_bad_requests_are_refused_before_they_start(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.validate([], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.validate([1] * engine.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.validate([1, 2], SamplingParams(logit_bias={10**7: 1.0}))
