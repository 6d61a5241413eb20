"""The engine on a tiny random model: preemption, chunking and text streams, with no demo model."""

import pytest
import torch

from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.engine.params import SamplingParams
from mistral_serve.tokenizer import ChatTokenizer
from tests.model.test_paged_numerics import mistral_config, reference_and_ours


class ByteTokenizer(ChatTokenizer):
    """Token id = byte value; id 0 is the end of sequence."""

    vocab_size = 256
    bos_token_id = None
    eos_token_ids = frozenset({0})
    supports_tools = False

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(m["content"] for m in messages))

    def encode(self, text):
        return list(text.encode())

    def decode(self, token_ids, skip_special_tokens=True):
        return bytes(t for t in token_ids if t or not skip_special_tokens).decode(errors="replace")

    def token_bytes(self, token_id):
        return bytes([token_id])

    def is_special(self, token_id):
        return token_id == 0


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
    roomy = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=256))
    expected, _, _ = run(roomy, requests)
    # 6 sequences growing to 44 tokens need 66 blocks; 24 forces preemption and recompute
    tight = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=24,
                                                           max_num_batched_tokens=16))
    got, _, reasons = run(tight, requests)
    assert got == expected
    assert set(reasons.values()) == {"length"}
    assert tight.scheduler.num_preemptions > 0
    assert tight.num_kv_blocks_used == 0


def test_a_prompt_that_fills_the_whole_cache_still_finishes_at_the_context_limit(model):
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=8))
    assert engine.max_seq_len == 32
    tokens, _, reasons = run(engine, [("r", prompts(1, 30)[0], SamplingParams(temperature=0, ignore_eos=True))])
    assert len(tokens["r"]) == 2 and reasons["r"] == "length"
    assert engine.num_kv_blocks_used == 0


def test_text_deltas_add_up_to_the_decoded_output_and_abort_frees_blocks(model):
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64))
    tokens, text, _ = run(engine, [("r", prompts(1)[0], SamplingParams(temperature=0, max_tokens=16))])
    assert text["r"] == ByteTokenizer().decode(tokens["r"])
    engine.add_request("gone", prompts(1)[0], SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    assert engine.num_kv_blocks_used > 0
    final = engine.abort_request("gone")
    assert [delta.finish_reason for delta in final] == ["abort"]
    assert engine.num_kv_blocks_used == 0 and not engine.has_unfinished_requests()


def test_a_failing_step_fails_only_its_requests_and_the_engine_keeps_going(model):
    from mistral_serve.engine.engine import StepError

    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64))
    engine.add_request("doomed", prompts(1)[0], SamplingParams(temperature=0, max_tokens=4))
    original = engine.runner.run
    engine.runner.run = lambda batch: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(StepError) as error:
        engine.step()
    assert error.value.request_ids == {"doomed"}
    assert engine.num_kv_blocks_used == 0
    engine.runner.run = original
    tokens, _, reasons = run(engine, [("fine", prompts(1)[0], SamplingParams(temperature=0, max_tokens=4))])
    assert len(tokens["fine"]) == 4


def test_every_choice_of_an_n_request_streams_to_its_end_through_the_async_engine(model):
    import asyncio

    from mistral_serve.engine.async_engine import AsyncEngine

    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_kv_blocks=64))
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
