"""Sampler: one step's logits in, one token per sequence out.

The phases run in this order, each a small function over the whole batch:

    logit bias and banned ids → grammar mask → repetition penalty → presence/frequency penalties
    → (greedy rows: argmax) → temperature → top-k → top-p → min-p → sample

The grammar mask (constrained decoding) is a packed bitmask, one row per sampling row and 32 tokens
per int32 word, bit j of word w allowing token 32 * w + j; a token whose bit is 0 gets -inf. Rows
without a grammar have every bit set. Masking draws no random numbers.

Sampling is the exponential race: with q ~ Exp(1) drawn independently per token,
argmax(probs / q) is token i with probability probs[i]. A row with its own generator draws exactly
vocab_size numbers from it per step, and nothing else does, so a seeded request gets the same tokens
whichever other rows share the batch and wherever it sits in it. Greedy rows draw nothing.

Reported logprobs are those of the raw model distribution, log_softmax of the logits as they came
in, before any of the phases above (what vLLM reports by default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
import itertools

import torch

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingRow:
    """How to choose the token of one row of the logits (one sequence that gets a token this step)."""

    temperature: float  # 0: greedy, the argmax after logit bias, bans and penalties
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off; otherwise exactly k tokens are kept, ties broken by lower id
    min_p: float = 0.0
    presence_penalty: float = 0.0  # over the output tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # over the output tokens: logit -= frequency * count
    repetition_penalty: float = 1.0  # over prompt and output tokens: logit > 0 ? logit / p : logit * p
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # ids outside the vocab are skipped
    banned_token_ids: tuple[int, ...] = ()  # set to -inf (EOS and stop ids before min_tokens)
    num_logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob and k alternatives
    generator: torch.Generator | None = None  # a seeded request's own RNG; None: the sampler's
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    # the same as (vocab_size,) float32 counts on the logits' device, kept up to date by the caller;
    # when given, they are used instead of the id lists, which then need not be built
    prompt_counts: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # None unless the row asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


class Sampler:
    """Chooses one token per row. `seed` seeds the RNG shared by rows without their own generator."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 token_bitmask: torch.Tensor | None = None) -> list[SampledToken]:
        """logits: (len(rows), vocab_size), any float dtype, on any device; token_bitmask:
        (len(rows), ceil(vocab_size / 32)) int32 on any device, or None. Returns one token per row."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
        processed = process_logits(logits, rows, token_bitmask)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, row in enumerate(rows) if row.is_greedy]
        if greedy:
            index = _index(greedy, logits.device)
            token_ids[index] = processed[index].argmax(dim=-1)
        randomized = [i for i, row in enumerate(rows) if not row.is_greedy]
        if randomized:
            index = _index(randomized, logits.device)
            token_ids[index] = self._sample(processed[index], [rows[i] for i in randomized])
        return _sampled_tokens(logits, token_ids, rows)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """logits: (num_rows, vocab_size) after bias and penalties. Returns (num_rows,) token ids."""
        logits = apply_temperature(logits, rows)
        logits = apply_top_k_top_p(logits, rows)
        logits = apply_min_p(logits, rows)
        probs = logits.softmax(dim=-1)
        return probs.div_(self._race_noise(rows, probs)).argmax(dim=-1)

    def _race_noise(self, rows: Sequence[SamplingRow], probs: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise shaped like probs: a seeded row's from its own generator, the rest in one draw."""
        num_rows, vocab_size = probs.shape
        noise = torch.empty_like(probs)
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            draw = torch.empty(len(shared), vocab_size, dtype=probs.dtype, device=probs.device)
            draw.exponential_(generator=self._generator(probs.device))
            if len(shared) == num_rows:
                noise = draw
            else:
                noise[_index(shared, probs.device)] = draw
        for i, row in enumerate(rows):
            if row.generator is not None:
                # drawn where the generator lives, so a CPU generator also serves CUDA logits
                own = torch.empty(vocab_size, dtype=probs.dtype, device=row.generator.device)
                noise[i].copy_(own.exponential_(generator=row.generator))
        # q == 0 would turn a banned token's 0 / q into NaN, which argmax would pick
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow],
                   token_bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of logits after logit bias, bans, the grammar mask and penalties: what greedy
    rows take the argmax of."""
    processed = logits.to(torch.float32, copy=True)
    _apply_bias_and_bans_(processed, rows)
    if token_bitmask is not None:
        apply_token_bitmask_(processed, token_bitmask)
    _apply_penalties_(processed, rows)
    return processed


_BIT_POSITIONS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask_(logits: torch.Tensor, token_bitmask: torch.Tensor) -> None:
    """Sets to -inf each token whose bit is 0 in the packed (num_rows, ceil(vocab_size / 32)) int32 bitmask."""
    num_rows, vocab_size = logits.shape
    if token_bitmask.shape != (num_rows, (vocab_size + 31) // 32):
        raise ValueError(f"a token bitmask of shape {tuple(token_bitmask.shape)} for logits of shape "
                         f"{(num_rows, vocab_size)}")
    device = logits.device
    bits = _BIT_POSITIONS.get(device)
    if bits is None:
        bits = _BIT_POSITIONS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = token_bitmask.to(device, non_blocking=True)
    is_allowed = ((words[:, :, None] >> bits) & 1).bool().view(num_rows, -1)[:, :vocab_size]
    logits.masked_fill_(~is_allowed, _NEG_INF)


def _apply_bias_and_bans_(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    vocab_size = logits.shape[1]
    bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
    for i, row in enumerate(rows):
        for token_id, bias in row.logit_bias.items():
            if 0 <= token_id < vocab_size:
                bias_rows.append(i)
                bias_ids.append(token_id)
                bias_values.append(bias)
        for token_id in row.banned_token_ids:
            if 0 <= token_id < vocab_size:
                ban_rows.append(i)
                ban_ids.append(token_id)
    device = logits.device
    if bias_rows:
        values = torch.tensor(bias_values, dtype=logits.dtype, device=device)
        logits.index_put_((_index(bias_rows, device), _index(bias_ids, device)), values, accumulate=True)
    if ban_rows:
        logits[_index(ban_rows, device), _index(ban_ids, device)] = _NEG_INF


def _apply_penalties_(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    positions = [i for i, row in enumerate(rows) if row.has_penalties]
    if not positions:
        return
    penalized = [rows[i] for i in positions]
    vocab_size, device = logits.shape[1], logits.device
    index = _index(positions, device)
    scores = logits[index]  # (num_penalized, vocab_size)
    output_counts = _row_counts(penalized, "output", vocab_size, device)
    # repetition: prompt and output tokens alike
    if any(row.repetition_penalty != 1.0 for row in penalized):
        repetition = _column([row.repetition_penalty for row in penalized], device)
        prompt_counts = _row_counts(penalized, "prompt", vocab_size, device)
        is_seen = (output_counts > 0) | (prompt_counts > 0)
        repeated = torch.where(scores > 0, scores / repetition, scores * repetition)
        scores = torch.where(is_seen, repeated, scores)
    # presence and frequency: output tokens only
    presence = _column([row.presence_penalty for row in penalized], device)
    frequency = _column([row.frequency_penalty for row in penalized], device)
    scores = scores - frequency * output_counts - presence * (output_counts > 0)
    logits[index] = scores


def _row_counts(rows: Sequence[SamplingRow], which: str, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(len(rows), vocab_size) float32 counts of the rows' prompt or output tokens: a row's own
    count tensor where it has one, else counted from its id list."""
    counts = [getattr(row, f"{which}_counts") for row in rows]
    missing = [i for i, c in enumerate(counts) if c is None]
    if missing:
        counted = _token_counts([getattr(rows[i], f"{which}_token_ids") for i in missing], vocab_size, device)
        for j, i in enumerate(missing):
            counts[i] = counted[j]
    return torch.stack(counts)


def _token_counts(sequences: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(len(sequences), vocab_size) float32: how often each token occurs in each sequence."""
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    token_ids = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long, device=device)
    row_ids = torch.repeat_interleave(torch.arange(len(sequences), device=device), lengths,
                                      output_size=len(token_ids))  # output_size: no device sync
    counts = torch.zeros(len(sequences), vocab_size, dtype=torch.float32, device=device)
    ones = torch.ones(len(token_ids), dtype=torch.float32, device=device)
    return counts.index_put_((row_ids, token_ids), ones, accumulate=True)


def apply_temperature(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Divides each row by its temperature (> 0). A tiny temperature gives huge but finite logits,
    and softmax subtracts the row maximum, so no NaN."""
    return logits / _column([row.temperature for row in rows], logits.device)


def apply_top_k_top_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Keeps each row's top_k best tokens (exactly k: a stable sort breaks ties by lower id), then,
    of those, the smallest set of best tokens whose probability sums to at least top_p (> 0), so the
    best token always stays. Sorts only when some row needs it."""
    vocab_size, device = logits.shape[1], logits.device
    top_k = [min(row.top_k, vocab_size) if row.top_k > 0 else vocab_size for row in rows]
    needs_top_k = any(k < vocab_size for k in top_k)
    needs_top_p = any(row.top_p < 1.0 for row in rows)
    if not (needs_top_k or needs_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (num_rows, vocab_size)
    ranks = torch.arange(vocab_size, device=device)
    is_removed = ranks[None, :] >= torch.tensor(top_k, device=device)[:, None]
    if needs_top_p:
        top_p = _column([row.top_p for row in rows], device)
        probs = sorted_logits.masked_fill(is_removed, _NEG_INF).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        is_removed |= (mass_before >= top_p) & (top_p < 1.0)  # the best token has 0 before it
    return logits.masked_fill(is_removed.scatter(1, order, is_removed), _NEG_INF)


def apply_min_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Removes tokens less likely than min_p times the row's best token."""
    if not any(row.min_p > 0.0 for row in rows):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * _column([row.min_p for row in rows], logits.device)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def _sampled_tokens(logits: torch.Tensor, token_ids: torch.Tensor,
                    rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Pairs the chosen ids with logprobs of the raw distribution, for the rows that want them."""
    chosen_ids = token_ids.tolist()
    wanting = [i for i, row in enumerate(rows) if row.num_logprobs is not None]
    if not wanting:
        return [SampledToken(token_id) for token_id in chosen_ids]
    index = _index(wanting, logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)  # (num_wanting, vocab_size)
    chosen = logprobs.gather(1, token_ids[index, None]).squeeze(1).tolist()
    max_num_logprobs = min(max(rows[i].num_logprobs for i in wanting), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_num_logprobs, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    tokens = [SampledToken(token_id) for token_id in chosen_ids]
    for j, i in enumerate(wanting):
        k = rows[i].num_logprobs
        tokens[i] = SampledToken(chosen_ids[i], chosen[j], tuple(zip(top_ids[j][:k], top_values[j][:k])))
    return tokens


def _index(positions: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """(len(values), 1) float32, to broadcast one value per row."""
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]
