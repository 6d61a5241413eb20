"""The engine on a tiny random model: preemption, chunking and text streams, with no demo model."""

import pytest
import torch

from mistral_serve.engine.builder import prepare_model
from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.engine.params import SamplingParams
from tests.engine.helpers import ByteTokenizer, FaultyModel
from tests.model.helpers import mistral_config, reference_and_ours


@pytest.fixture(scope="module")
def model():
    return reference_and_ours(mistral_config(vocab_size=ByteTokenizer.vocab_size))[1]


def run(engine, requests):
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    tokens = {request_id: [] for request_id, _, _ in requests}
    text = {request_id: "" for request_id, _, _ in requests}
    reasons = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids
            text[delta.request_id] += delta.text
            if delta.finish_reason:
                reasons[delta.request_id] = delta.finish_reason
    return tokens, text, reasons


def prompts(count, length=20):
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(1, 256, (length,), generator=generator).tolist() for _ in range(count)]


def test_preemption_under_a_tiny_kv_cache_gives_the_same_tokens_as_a_roomy_one(model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts(6))]
    roomy = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=256))
    expected, _, _ = run(roomy, requests)
    # 6 sequences growing to 44 tokens need 66 blocks; 24 forces preemption and recompute
    tight = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=24,
                                                           max_num_batched_tokens=16))
    got, _, reasons = run(tight, requests)
    assert got == expected
    assert set(reasons.values()) == {"length"}
    assert tight.scheduler.num_preemptions > 0
    assert tight.num_kv_blocks_used == 0


def test_a_prompt_that_fills_the_whole_cache_still_finishes_at_the_context_limit(model):
    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=8))
    assert engine.max_model_len == 32
    tokens, _, reasons = run(engine, [("r", prompts(1, 30)[0], SamplingParams(temperature=0, ignore_eos=True))])
    assert len(tokens["r"]) == 2 and reasons["r"] == "length"
    assert engine.num_kv_blocks_used == 0


def test_text_deltas_add_up_to_the_decoded_output_and_abort_frees_blocks(model):
    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64))
    tokens, text, _ = run(engine, [("r", prompts(1)[0], SamplingParams(temperature=0, max_tokens=16))])
    assert text["r"] == ByteTokenizer().decode(tokens["r"])
    engine.add_request("gone", prompts(1)[0], SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    assert engine.num_kv_blocks_used > 0
    final = engine.abort_request("gone")
    assert [delta.finish_reason for delta in final] == ["abort"]
    assert engine.num_kv_blocks_used == 0 and not engine.has_unfinished_requests()


def faulty_engine(model):
    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=128))
    engine.runner.model = FaultyModel(engine.runner.model)
    return engine


def healthy_requests():
    return [("greedy", prompts(3)[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
            ("seeded", prompts(3)[1], SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)),
            ("penalized", prompts(3)[2], SamplingParams(temperature=0, frequency_penalty=1.5, max_tokens=12,
                                                        ignore_eos=True))]


def tokens_of_healthy_requests_alone(model) -> dict[str, list[int]]:
    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=128))
    return run(engine, healthy_requests())[0]


def with_healthy_requests(engine: LLMEngine) -> LLMEngine:
    for request_id, prompt, params in healthy_requests():
        engine.add_request(request_id, prompt, params)
    return engine


def test_a_request_that_breaks_the_model_run_fails_alone_and_the_others_go_on_unchanged(model):
    expected = tokens_of_healthy_requests_alone(model)
    engine = with_healthy_requests(faulty_engine(model))
    got = {request_id: [] for request_id in expected}
    for _ in range(3):  # under way when the bad request joins their batch
        for delta in engine.step():
            got[delta.request_id] += delta.token_ids
    engine.add_request("poisoned", [FaultyModel.POISON, *prompts(1)[0]], SamplingParams(max_tokens=12))
    errors = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.error is not None:
                errors[delta.request_id] = (delta.error, delta.finish_reason, delta.is_request_finished)
            else:
                got[delta.request_id] += delta.token_ids
    assert set(errors) == {"poisoned"}
    error, reason, is_finished = errors["poisoned"]
    assert "model run failed" in str(error) and reason == "abort" and is_finished
    assert got == expected
    assert engine.num_kv_blocks_used == 0


def test_a_fault_that_does_not_recur_fails_nobody(model):
    expected = tokens_of_healthy_requests_alone(model)
    engine = with_healthy_requests(faulty_engine(model))
    got = {delta.request_id: list(delta.token_ids) for delta in engine.step()}
    engine.runner.model.fail_once = True  # the next batch fails, and each request alone does not
    while engine.has_unfinished_requests():
        for delta in engine.step():
            assert delta.error is None
            got[delta.request_id] += delta.token_ids
    assert got == expected


def test_a_sampling_fault_leaves_a_seeded_request_drawing_what_it_would_have_drawn(model):
    expected = tokens_of_healthy_requests_alone(model)
    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=128))
    sample = engine.runner.sampler

    def sample_then_fail_on_a_marked_row(logits, rows, *args):
        tokens = sample(logits, rows, *args)  # the seeded row's generator has drawn by now
        if any(row.logit_bias.get(1) == -7.0 for row in rows):
            raise RuntimeError("sampling failed")
        return tokens
    engine.runner.sampler = sample_then_fail_on_a_marked_row
    with_healthy_requests(engine)
    engine.add_request("marked", prompts(1)[0], SamplingParams(max_tokens=12, logit_bias={1: -7.0}))
    got = {request_id: [] for request_id in expected}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.request_id == "marked":
                assert delta.error is not None
            else:
                got[delta.request_id] += delta.token_ids
    assert got == expected


def test_the_only_request_of_a_failing_run_fails_and_the_engine_keeps_going(model):
    engine = faulty_engine(model)
    engine.add_request("doomed", [FaultyModel.POISON, *prompts(1)[0]], SamplingParams(temperature=0, max_tokens=4))
    [delta] = engine.step()
    assert delta.request_id == "doomed" and delta.error is not None and delta.is_request_finished
    assert engine.num_kv_blocks_used == 0 and not engine.has_unfinished_requests()
    tokens, _, reasons = run(engine, [("fine", prompts(1)[0], SamplingParams(temperature=0, max_tokens=4))])
    assert len(tokens["fine"]) == 4


def test_every_choice_of_an_n_request_streams_to_its_end_through_the_async_engine(model):
    import asyncio

    from mistral_serve.engine.async_engine import AsyncEngine

    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64))
    runner = AsyncEngine(engine)
    runner.start()

    async def collect():
        counts, reasons = {}, {}
        async for delta in runner.generate(prompts(1)[0], SamplingParams(n=3, temperature=0, max_tokens=5,
                                                                          ignore_eos=True)):
            counts[delta.index] = counts.get(delta.index, 0) + len(delta.token_ids)
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason
        return counts, reasons
    try:
        counts, reasons = asyncio.run(collect())
    finally:
        runner.shutdown()
    # the three choices finish in the same step: each must still deliver its last token
    assert counts == {0: 5, 1: 5, 2: 5}
    assert reasons == {0: "length", 1: "length", 2: "length"}


def test_the_async_engine_runs_its_loop_on_the_thread_that_loaded_the_model_and_restarts_there(model):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    import threading

    from mistral_serve.engine.async_engine import AsyncEngine

    executor = ThreadPoolExecutor(max_workers=1)
    loading_thread = executor.submit(threading.get_ident).result()
    engine = LLMEngine(prepare_model(model), ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64))
    stepping_threads = set()
    step = engine.step
    engine.step = lambda: stepping_threads.add(threading.get_ident()) or step()
    runner = AsyncEngine(engine, runs_on=executor)

    async def generate():
        return [delta async for delta in runner.generate(prompts(1)[0], SamplingParams(temperature=0, max_tokens=3,
                                                                                        ignore_eos=True))]
    try:
        for _ in range(2):  # a stopped engine starts again on the same thread
            runner.start()
            assert sum(len(delta.token_ids) for delta in asyncio.run(generate())) == 3
            runner.shutdown()
    finally:
        executor.shutdown()
    assert stepping_threads == {loading_thread}
