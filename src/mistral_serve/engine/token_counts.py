"""Per-sequence token counts for the sampler's penalties, kept on the device and updated in place.

Penalties need, for every penalized row of every step, how often each vocabulary token occurs
in the sequence's output (and whether it occurs in the prompt). Rebuilding that from the token
lists costs time in the sequence's length every step; here the prompt is counted once and each
step adds only the tokens that are new since the last one.
"""

from __future__ import annotations

import torch

from mistral_serve.engine.sequence import Sequence


class TokenCounts:
    """(vocab_size,) float32 counts of one sequence's prompt and output tokens, on `device`."""

    def __init__(self, seq: Sequence, vocab_size: int, device: torch.device, *, needs_prompt: bool):
        self.vocab_size, self.device = vocab_size, device
        self.prompt = None
        if needs_prompt:
            self.prompt = _add_counts_(torch.zeros(vocab_size, dtype=torch.float32, device=device),
                                       seq.prompt_token_ids)
        self.output = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.num_counted = 0  # output tokens already in `output`

    def update(self, seq: Sequence) -> None:
        """Count the output tokens the sequence gained since the last update."""
        new = seq.token_ids[seq.num_prompt_tokens + self.num_counted:]
        if new:
            _add_counts_(self.output, new)
            self.num_counted += len(new)


def _add_counts_(counts: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    index = torch.tensor(token_ids, dtype=torch.long).to(counts.device, non_blocking=True)
    ones = torch.ones(len(token_ids), dtype=counts.dtype, device=counts.device)
    return counts.index_put_((index,), ones, accumulate=True)
