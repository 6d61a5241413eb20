import math

import pytest
import torch

from mistral_serve.model.sampler import SampledToken, Sampler, SamplingRow, process_logits

# a known 5-token distribution
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = PROBS.log()
NUM_DRAWS = 4000
TOLERANCE = 0.03  # about 4 standard deviations of a frequency over 4000 draws


def sample_ids(logits: torch.Tensor, row: SamplingRow, num_rows: int, seed: int = 0) -> list[int]:
    """num_rows independent draws of the same row, in one call."""
    tokens = Sampler(seed=seed)(logits.expand(num_rows, -1), [row] * num_rows)
    return [t.token_id for t in tokens]


def frequencies(ids: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(ids), minlength=vocab_size).float() / len(ids)


def seeded_sequence(seed: int, step_logits: list[torch.Tensor], batch_layouts: list[tuple[int, int]]) -> list[int]:
    """Tokens of one seeded request over several steps; at each step it sits at `position` among
    `num_others` unseeded random rows."""
    sampler, generator = Sampler(seed=123), torch.Generator().manual_seed(seed)
    tokens = []
    for logits, (position, num_others) in zip(step_logits, batch_layouts):
        other = SamplingRow(temperature=1.0)
        rows = [other] * num_others
        rows.insert(position, SamplingRow(temperature=1.0, generator=generator, output_token_ids=tuple(tokens)))
        batch = torch.randn(num_others + 1, logits.shape[0], generator=torch.Generator().manual_seed(len(tokens)))
        batch[position] = logits
        tokens.append(sampler(batch, rows)[position].token_id)
    return tokens


# greedy, bias and bans

def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    tokens = Sampler()(logits, [SamplingRow(temperature=0.0)] * 6)
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()
    assert tokens[0] == SampledToken(tokens[0].token_id, None, ())


def test_logit_bias_changes_greedy_choice():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    tokens = Sampler()(logits, [SamplingRow(temperature=0.0, logit_bias={2: 1.6})])
    assert tokens[0].token_id == 2


def test_logit_bias_of_minus_100_effectively_bans():
    assert 0 not in sample_ids(torch.tensor([5.0, 0.0]), SamplingRow(temperature=1.0, logit_bias={0: -100.0}), 500)


def test_banned_ids_are_never_chosen():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    assert Sampler()(logits[None], [SamplingRow(temperature=0.0, banned_token_ids=(0, 1))])[0].token_id == 2
    ids = sample_ids(logits, SamplingRow(temperature=2.0, banned_token_ids=(0, 1)), 1000)
    assert set(ids) == {2, 3}


# penalties, on a hand-made vector

HAND = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
PROMPT, OUTPUT = (0, 1), (3, 3, 2)


def processed(**penalties) -> list[float]:
    row = SamplingRow(temperature=0.0, prompt_token_ids=PROMPT, output_token_ids=OUTPUT, **penalties)
    return process_logits(HAND, [row])[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    # prompt tokens 0, 1 and output tokens 2, 3 are seen; token 4 is not
    assert processed(repetition_penalty=2.0) == pytest.approx([1.0, -2.0, 0.25, 1.5, -2.0])


def test_presence_penalty_subtracts_once_per_output_token():
    assert processed(presence_penalty=0.5) == pytest.approx([2.0, -1.0, 0.0, 2.5, -2.0])


def test_frequency_penalty_subtracts_per_occurrence_in_output():
    assert processed(frequency_penalty=0.25) == pytest.approx([2.0, -1.0, 0.25, 2.5, -2.0])


def test_penalties_combine_after_repetition():
    expected = [1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 0.5 - 0.5, -2.0]
    combined = processed(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert combined == pytest.approx(expected)


def test_logit_bias_applies_before_repetition_penalty():
    assert processed(repetition_penalty=2.0, logit_bias={3: 1.0})[3] == pytest.approx((3.0 + 1.0) / 2.0)


def test_penalties_flip_the_greedy_choice():
    rows = [SamplingRow(temperature=0.0, output_token_ids=OUTPUT, frequency_penalty=1.0),
            SamplingRow(temperature=0.0, prompt_token_ids=(3,), repetition_penalty=2.0),
            SamplingRow(temperature=0.0, output_token_ids=OUTPUT)]
    assert [t.token_id for t in Sampler()(HAND.expand(3, -1), rows)] == [0, 0, 3]


def test_process_logits_leaves_the_input_alone():
    logits = HAND.clone()
    Sampler()(logits, [SamplingRow(temperature=1.0, logit_bias={0: 5.0}, repetition_penalty=2.0,
                                   output_token_ids=OUTPUT, banned_token_ids=(1,))])
    assert torch.equal(logits, HAND)


# truncation

def test_top_k_1_is_greedy():
    logits = torch.randn(200, 30, generator=torch.Generator().manual_seed(1))
    tokens = Sampler(seed=0)(logits, [SamplingRow(temperature=1.5, top_k=1)] * 200)
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_k_best():
    assert set(sample_ids(LOGITS, SamplingRow(temperature=1.0, top_k=2), 1000)) == {0, 1}


def test_small_top_p_keeps_only_the_top_token():
    assert set(sample_ids(LOGITS, SamplingRow(temperature=1.0, top_p=0.01), 500)) == {0}


def test_top_p_keeps_the_smallest_set_reaching_it():
    # 0.4 alone < 0.6 <= 0.4 + 0.3
    assert set(sample_ids(LOGITS, SamplingRow(temperature=1.0, top_p=0.6), 1000)) == {0, 1}


def test_min_p_removes_tokens_below_a_fraction_of_the_best():
    # threshold 0.3 * 0.4 = 0.12 keeps 0.4, 0.3 and 0.15
    assert set(sample_ids(LOGITS, SamplingRow(temperature=1.0, min_p=0.3), 1000)) == {0, 1, 2}


def test_min_p_applies_after_temperature():
    # at temperature 0.5 the probabilities go as PROBS**2: 0.15 is now below 0.3 * best
    assert set(sample_ids(LOGITS, SamplingRow(temperature=0.5, min_p=0.3), 1000)) == {0, 1}


# the distribution

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_matches_softmax_of_logits_over_temperature(temperature):
    expected = (LOGITS / temperature).softmax(dim=-1)
    observed = frequencies(sample_ids(LOGITS, SamplingRow(temperature=temperature), NUM_DRAWS), 5)
    assert observed.tolist() == pytest.approx(expected.tolist(), abs=TOLERANCE)


def test_seeded_rows_follow_the_distribution_too():
    rows = [SamplingRow(temperature=1.0, generator=torch.Generator().manual_seed(i)) for i in range(NUM_DRAWS)]
    ids = [t.token_id for t in Sampler()(LOGITS.expand(NUM_DRAWS, -1), rows)]
    assert frequencies(ids, 5).tolist() == pytest.approx(PROBS.tolist(), abs=TOLERANCE)


def test_tiny_temperature_gives_no_nan_and_the_best_token():
    logits = torch.tensor([[-50.0, 30.0, 30.001, float("-inf"), 29.0] + [-1e30] * 3] * 50)
    row = SamplingRow(temperature=1e-5, top_p=0.9, min_p=0.1, top_k=3, num_logprobs=2)
    tokens = Sampler(seed=0)(logits, [row] * 50)
    assert {t.token_id for t in tokens} == {2}
    assert all(math.isfinite(t.logprob) for t in tokens)
    plain = Sampler(seed=0)(logits, [SamplingRow(temperature=1e-5)] * 50)
    assert {t.token_id for t in plain} == {2}


def test_vocab_of_one():
    assert Sampler()(torch.zeros(2, 1), [SamplingRow(temperature=1.0, top_p=0.5, num_logprobs=5),
                                         SamplingRow(temperature=0.0)])[0] == SampledToken(0, 0.0, ((0, 0.0),))


# reproducibility

def test_greedy_rows_consume_no_randomness():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(9)
    state = generator.get_state()
    sampler = Sampler(seed=5)
    greedy_rows = [SamplingRow(temperature=0.0, generator=generator), SamplingRow(temperature=0.0),
                   SamplingRow(temperature=0.0, top_k=3)]
    sampler(logits, greedy_rows)
    assert torch.equal(generator.get_state(), state)
    random_rows = [SamplingRow(temperature=1.0)] * 3
    assert sampler(logits, random_rows) == Sampler(seed=5)(logits, random_rows)


def test_same_seed_gives_same_tokens_whatever_the_batch():
    step_logits = [torch.randn(50, generator=torch.Generator().manual_seed(100 + i)) * 0.3 for i in range(8)]
    alone = seeded_sequence(7, step_logits, [(0, 0)] * 8)
    crowded = seeded_sequence(7, step_logits, [(0, 3), (2, 4), (5, 5), (1, 1), (3, 7), (0, 2), (4, 4), (2, 9)])
    assert crowded == alone
    assert seeded_sequence(8, step_logits, [(0, 0)] * 8) != alone


def test_same_sampler_seed_repeats_unseeded_rows():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    rows = [SamplingRow(temperature=1.0)] * 4
    assert Sampler(seed=1)(logits, rows) == Sampler(seed=1)(logits, rows)
    assert Sampler(seed=1)(logits, rows) != Sampler(seed=2)(logits, rows)


# logprobs

def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    rows = [SamplingRow(temperature=0.7, top_k=5, logit_bias={7: 3.0}, repetition_penalty=1.5,
                        output_token_ids=(1, 2), num_logprobs=4),
            SamplingRow(temperature=0.0, num_logprobs=20)]
    raw = logits.log_softmax(dim=-1)
    for token, row_raw, k in zip(Sampler(seed=0)(logits, rows), raw, (4, 20)):
        assert token.logprob == pytest.approx(row_raw[token.token_id].item(), abs=1e-6)
        best_values, best_ids = row_raw.topk(k)
        assert [i for i, _ in token.top_logprobs] == best_ids.tolist()
        assert [v for _, v in token.top_logprobs] == pytest.approx(best_values.tolist(), abs=1e-6)
        values = [v for _, v in token.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_zero_logprobs_gives_the_chosen_logprob_only():
    token = Sampler()(LOGITS[None], [SamplingRow(temperature=0.0, num_logprobs=0)])[0]
    assert token.token_id == 0
    assert token.logprob == pytest.approx(math.log(0.4), abs=1e-6)
    assert token.top_logprobs == ()


def test_wrong_number_of_rows_is_an_error():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [SamplingRow(temperature=0.0)])


# the grammar mask (constrained decoding)

def packed_bitmask(allowed_per_row: list[set[int] | None], vocab_size: int) -> torch.Tensor:
    """(num_rows, ceil(vocab_size / 32)) int32: bit j of word w allows token 32 * w + j; None allows all."""
    num_words = (vocab_size + 31) // 32
    rows = []
    for allowed in allowed_per_row:
        ids = range(num_words * 32) if allowed is None else allowed
        words = [0] * num_words
        for token_id in ids:
            words[token_id // 32] |= 1 << (token_id % 32)
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])  # as int32
    return torch.tensor(rows, dtype=torch.int32)


def test_greedy_takes_the_best_allowed_token():
    tokens = Sampler()(LOGITS[None], [SamplingRow(temperature=0)], packed_bitmask([{2, 4}], 5))
    assert tokens[0].token_id == 2


def test_sampling_stays_within_the_mask_in_proportion():
    row = SamplingRow(temperature=1.0)
    mask = packed_bitmask([{1, 3}] * NUM_DRAWS, 5)
    ids = [t.token_id for t in Sampler(seed=0)(LOGITS.expand(NUM_DRAWS, -1), [row] * NUM_DRAWS, mask)]
    counts = frequencies(ids, 5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1] - 0.75) < TOLERANCE  # 0.3 / (0.3 + 0.1)


def test_the_mask_overrides_logit_bias_and_penalties():
    row = SamplingRow(temperature=0, logit_bias={0: 100.0}, repetition_penalty=0.5, output_token_ids=(0,))
    assert Sampler()(LOGITS[None], [row], packed_bitmask([{3}], 5))[0].token_id == 3


def test_unmasked_rows_in_a_masked_batch_are_untouched():
    logits = torch.randn(3, 70, generator=torch.Generator().manual_seed(0))
    rows = [SamplingRow(temperature=1.0)] * 3
    mask = packed_bitmask([None, {5, 64, 69}, None], 70)  # two words, the second partly used
    processed = process_logits(logits, rows, mask)
    assert torch.equal(processed[[0, 2]], logits[[0, 2]])
    assert torch.isfinite(processed[1]).nonzero().flatten().tolist() == [5, 64, 69]


def test_the_mask_draws_no_randomness_and_leaves_logprobs_raw():
    generators = [torch.Generator().manual_seed(7) for _ in range(2)]
    masked = Sampler()(LOGITS[None], [SamplingRow(temperature=1.0, generator=generators[0], num_logprobs=2)],
                       packed_bitmask([{4}], 5))[0]
    Sampler()(LOGITS[None], [SamplingRow(temperature=1.0, generator=generators[1])])
    assert torch.equal(generators[0].get_state(), generators[1].get_state())
    assert masked.token_id == 4
    assert masked.logprob == pytest.approx(math.log(0.05), abs=1e-5)
    assert [t for t, _ in masked.top_logprobs] == [0, 1]


def test_a_bitmask_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="bitmask"):
        Sampler()(LOGITS[None], [SamplingRow(temperature=0)], packed_bitmask([{1}], 64))
