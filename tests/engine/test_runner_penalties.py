"""Penalty counts kept by the runner across steps equal counts rebuilt from the token lists."""

import torch

from mistral_serve.engine.params import SamplingParams
from mistral_serve.engine.sequence import Sequence
from mistral_serve.engine.token_counts import TokenCounts
from mistral_serve.model.sampler import SamplingRow, process_logits

VOCAB = 50


def counts_of(token_ids):
    return torch.bincount(torch.tensor(token_ids, dtype=torch.long), minlength=VOCAB).float()


def test_counts_follow_the_sequence_step_by_step():
    seq = Sequence("r", 0, [3, 3, 7], SamplingParams(max_tokens=10, repetition_penalty=1.2), max_total_tokens=100)
    counts = TokenCounts(seq, VOCAB, torch.device("cpu"), needs_prompt=True)
    for token_id in [5, 3, 5, 49, 0]:
        seq.append_token(token_id)
        counts.update(seq)
        counts.update(seq)  # a second update with nothing new counts nothing twice
        assert torch.equal(counts.output, counts_of(seq.output_token_ids))
    assert torch.equal(counts.prompt, counts_of([3, 3, 7]))


def test_two_tokens_between_updates_are_both_counted():
    seq = Sequence("r", 0, [1], SamplingParams(max_tokens=10, frequency_penalty=1.0), max_total_tokens=100)
    counts = TokenCounts(seq, VOCAB, torch.device("cpu"), needs_prompt=False)
    seq.append_token(4)
    seq.append_token(4)
    counts.update(seq)
    assert counts.prompt is None and counts.output[4] == 2


def test_sampler_gives_the_same_logits_from_counts_as_from_lists():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=generator)
    prompts = [[1, 2, 2], [4], [9, 9]]
    outputs = [[2, 5, 5, 5], [], [9, 30]]
    penalties = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    from_lists = [SamplingRow(0.0, prompt_token_ids=p, output_token_ids=o, **penalties)
                  for p, o in zip(prompts, outputs)]
    from_counts = [SamplingRow(0.0, prompt_counts=counts_of(p), output_counts=counts_of(o) if o else
                               torch.zeros(VOCAB), **penalties) for p, o in zip(prompts, outputs)]
    # one row of each kind in one batch: the sampler mixes them
    mixed = [from_counts[0], from_lists[1], from_counts[2]]
    expected = process_logits(logits, from_lists)
    assert not torch.equal(expected, logits)
    assert torch.equal(process_logits(logits, from_counts), expected)
    assert torch.equal(process_logits(logits, mixed), expected)
