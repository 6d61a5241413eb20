"""Our model over the paged KV cache against transformers on the same random weights.

Sequences are driven through the real scheduler with a small token budget, so steps mix decodes
and prefill chunks of different lengths, prompts are chunked, a later prompt hits the prefix
cache, and the sliding window is shorter than the sequences. Tokens are teacher-forced, so every
fed token's logits can be compared with the reference's logits at the same position.

Tolerance: 1e-4 absolute on float32 logits.
"""

import pytest
import torch
import transformers

from mistral_serve.engine.block_manager import BlockManager
from mistral_serve.engine.params import SamplingParams
from mistral_serve.engine.runner import ModelRunner
from mistral_serve.engine.scheduler import Scheduler
from mistral_serve.engine.sequence import Sequence
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.mistral import Transformer

TOLERANCE = 1e-4


def mistral_config(**overrides):
    values = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_theta=1e6, sliding_window=8, tie_word_embeddings=False)
    values.update(overrides)
    return transformers.MistralConfig(**values)


def llama_config(**overrides):
    values = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                  rope_theta=1e4, tie_word_embeddings=True)
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def reference_and_ours(hf_config):
    torch.manual_seed(0)
    model_class = (transformers.LlamaForCausalLM if hf_config.model_type == "llama"
                   else transformers.MistralForCausalLM)
    hf_config._attn_implementation = "eager"
    reference = model_class(hf_config).eval()
    config = ModelConfig.from_hf_config(hf_config.to_dict())
    ours = Transformer(config)
    state = {name.removeprefix("model."): tensor for name, tensor in reference.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=False)
    ours.tie_weights()
    ours.rotary.build(torch.device("cpu"))
    return reference, ours.eval()


def run_teacher_forced(model, sequences_with_arrival, *, block_size=4, num_blocks=64, budget=12):
    """Run (arrival_step, full_token_ids, prompt_len) through the scheduler; return each sequence's
    logits per position, taken from whichever step fed that position."""
    bm = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget, eos_token_ids=frozenset())
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, eos_token_ids=frozenset())
    pending = sorted(sequences_with_arrival, key=lambda item: item[0])
    seqs, logits_by_seq, step, saw_mixed = [], {}, 0, False
    while pending or scheduler.num_unfinished:
        while pending and pending[0][0] <= step:
            _, full, prompt_len = pending.pop(0)
            seq = Sequence(f"r{len(seqs)}", 0, full[:prompt_len], SamplingParams(max_tokens=len(full) - prompt_len),
                           max_total_tokens=1000)
            seq.full = full
            seqs.append(seq)
            logits_by_seq[seq.seq_id] = {}
            scheduler.add(seq)
        batch = scheduler.schedule()
        items = sorted(batch, key=lambda item: item.num_new_tokens != 1)
        saw_mixed |= any(i.num_new_tokens == 1 for i in items) and any(i.num_new_tokens > 1 for i in items)
        token_ids, positions, meta, _ = runner.prepare_inputs(items)
        with torch.inference_mode():
            logits = model(token_ids, positions, runner.kv_caches, meta, torch.arange(len(token_ids)))
        row = 0
        for item in items:
            for offset in range(item.num_new_tokens):
                logits_by_seq[item.seq.seq_id][item.start_position + offset] = logits[row]
                row += 1
        scheduler.postprocess(batch, [item.seq.full[item.seq.num_tokens] if item.samples_token else None
                                      for item in batch])
        step += 1
    return seqs, logits_by_seq, saw_mixed, bm


@pytest.mark.parametrize("hf_config", [mistral_config(), llama_config()], ids=["mistral-gqa-window", "llama-tied"])
def test_logits_match_transformers_through_mixed_chunked_and_cached_steps(hf_config):
    reference, ours = reference_and_ours(hf_config)
    generator = torch.Generator().manual_seed(1)
    shared_prefix = torch.randint(0, 256, (14,), generator=generator).tolist()
    work = [
        (0, torch.randint(0, 256, (30,), generator=generator).tolist(), 20),  # prompt chunked, then decodes
        (1, torch.randint(0, 256, (18,), generator=generator).tolist(), 5),
        (2, shared_prefix + torch.randint(0, 256, (10,), generator=generator).tolist(), 17),
        # arrives once the previous prompt is cached, so its first blocks come from the prefix cache
        (9, shared_prefix + torch.randint(0, 256, (6,), generator=generator).tolist(), 16),
    ]
    seqs, logits_by_seq, saw_mixed, bm = run_teacher_forced(ours, work)
    assert saw_mixed, "the scenario must mix decodes and prefill chunks in one step"
    assert seqs[3].num_cached_tokens == 12, "the last prompt must hit the prefix cache"
    for seq in seqs:
        full = torch.tensor([seq.full])
        with torch.no_grad():
            expected = reference(full).logits[0]
        got = logits_by_seq[seq.seq_id]
        first = seq.num_cached_tokens
        assert sorted(got) == list(range(first, len(seq.full) - 1))
        for position, value in got.items():
            torch.testing.assert_close(value, expected[position], atol=TOLERANCE, rtol=0)
    assert bm.num_free_blocks == bm.num_blocks
