"""ModelRunner: the one place where the scheduler's Python lists become tensors.

It runs a model already made ready by `prepare_for_inference` (model/prepare.py), and rewrites
nothing. It owns the KV cache, lays one step out as a flat token batch (decodes first, then prefill
chunks), runs the model and the sampler, and hands back one token per sequence that samples.
A sequence with a grammar matcher (constrained decoding) gets its row of the token bitmask filled
before sampling, and its sampled token fed to the matcher after.
"""

from __future__ import annotations

import torch

from mistral_serve.engine.guided import GrammarMatcher, allocate_token_bitmask
from mistral_serve.engine.scheduler import ScheduledSequence
from mistral_serve.engine.sequence import Sequence
from mistral_serve.engine.token_counts import TokenCounts
from mistral_serve.model.attention import AttentionMetadata, PrefillChunk, decode_layout
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.prepared import PreparedModel
from mistral_serve.model.sampler import SampledToken, Sampler, SamplingRow


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


class ModelRunner:
    def __init__(self, prepared: PreparedModel, *, num_blocks: int, block_size: int,
                 eos_token_ids: frozenset[int], seed: int | None = None):
        self.model = prepared.model
        self.config = prepared.config
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.device, self.dtype = prepared.device, prepared.dtype
        shape = (num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.config.num_layers)]
        self.fused_decode = prepared.fused_decode
        self.attention_kernels = prepared.attention_kernels
        self.sampler = Sampler(seed)
        self.generators: dict[int, torch.Generator] = {}  # per seeded sequence
        self.matchers: dict[int, GrammarMatcher] = {}  # per constrained sequence
        self.token_counts: dict[int, TokenCounts] = {}  # per sequence with penalties

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> list[SampledToken | None]:
        """One forward pass over the batch; a sampled token for each sequence that reached its end."""
        if not batch:
            return []
        # decodes first: the attention batches them, and prefill chunks follow one by one
        order = sorted(range(len(batch)), key=lambda i: batch[i].num_new_tokens != 1)
        items = [batch[i] for i in order]
        token_ids, positions, meta, logits_indices = self.prepare_inputs(items)
        # the fused step only while it runs the runner's model (tests wrap the model to inject faults)
        uses_fused = self.fused_decode is not None and not meta.prefills and self.fused_decode.model is self.model
        step = self.fused_decode if uses_fused else self.model
        logits = step(token_ids, positions, self.kv_caches, meta, logits_indices)
        sampling_seqs = [item.seq for item in items if item.samples_token]
        sampled = iter(self._sample_or_restore(logits, sampling_seqs) if sampling_seqs else [])
        results_in_order = [next(sampled) if item.samples_token else None for item in items]
        results: list[SampledToken | None] = [None] * len(batch)
        for position, index in enumerate(order):
            results[index] = results_in_order[position]
        return results

    def _sample_or_restore(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """Sample; if that fails, leave the seeded generators as they were, so that running the
        same sequences again (the engine does, to find which one failed) draws the same tokens."""
        saved = [(generator, generator.get_state()) for seq in seqs
                 if (generator := self._generator(seq)) is not None]
        try:
            return self._sample(logits, seqs)
        except Exception:
            for generator, state in saved:
                generator.set_state(state)
            raise

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        rows = [self._sampling_row(seq) for seq in seqs]
        constrained = [(i, self.matchers[seq.seq_id]) for i, seq in enumerate(seqs) if seq.seq_id in self.matchers]
        if not constrained:
            return self.sampler(logits, rows)
        # every bit set: rows without a grammar stay unconstrained
        token_bitmask = allocate_token_bitmask(len(rows), self.config.vocab_size)  # (num_rows, ceil(vocab / 32))
        for i, matcher in constrained:
            matcher.fill_next_token_bitmask(token_bitmask, i)
        tokens = self.sampler(logits, rows, token_bitmask)
        accepted = []
        for i, matcher in constrained:
            if not matcher.accept_token(tokens[i].token_id):
                for earlier in accepted:  # all or nothing: the step is not over for any of them
                    earlier.rollback(1)
                raise RuntimeError(f"the grammar rejected token {tokens[i].token_id} that its own mask allowed")
            accepted.append(matcher)
        return tokens

    def prepare_inputs(self, items: list[ScheduledSequence]):
        """Token ids, positions, attention metadata and the rows to take logits from.
        Decodes (one new token) must come before prefill chunks in `items`."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        chunks: list[tuple[int, int, int, list[int]]] = []  # (token_start, num_tokens, start, table)
        block_size = self.block_size
        for item in items:
            seq, start, count = item.seq, item.start_position, item.num_new_tokens
            table = seq.block_table
            if count == 1:
                token_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                chunks.append((len(token_ids), count, start, table))
                token_ids += seq.token_ids[start:start + count]
                positions += range(start, start + count)
                slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + count)]
            if item.samples_token:
                logits_indices.append(len(token_ids) - 1)
        width = max(map(len, decode_tables), default=0)
        padded_tables = [x for table in decode_tables for x in (*table, *[0] * (width - len(table)))]
        # every integer input of the step in one host tensor, one copy to the device
        parts = [token_ids, positions, slots, logits_indices, decode_lens, padded_tables,
                 *(table for *_, table in chunks)]
        ints = self._tensor([x for part in parts for x in part]).split([len(part) for part in parts])
        token_ids_t, positions_t, slots_t, logits_indices_t, lens_t, tables_t = ints[:6]
        num_decodes = len(decode_lens)
        layout = None
        if num_decodes:
            tables_t = tables_t.view(num_decodes, width)
            if self.attention_kernels is None:
                layout = decode_layout(tables_t, lens_t, block_size, self.config.sliding_window, max(decode_lens),
                                       min(decode_lens), self.dtype)
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            num_decodes=num_decodes,
            decode_block_tables=tables_t if num_decodes else None,
            decode_context_lens=lens_t if num_decodes else None,
            prefills=tuple(PrefillChunk(first, count, start, table_t)
                           for (first, count, start, _), table_t in zip(chunks, ints[6:])),
            sliding_window=self.config.sliding_window,
            decode_layout=layout,
            kernels=self.attention_kernels,
        )
        return token_ids_t, positions_t, meta, logits_indices_t

    def _tensor(self, values: list[int]) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.tensor(values, dtype=torch.int64)
        # pinned, so the copy is asynchronous and the step does not wait on the device
        return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(self.device, non_blocking=True)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        banned: tuple[int, ...] = ()
        if seq.num_output_tokens < params.min_tokens:
            # a grammar alone decides where its output may end
            allows_eos = params.ignore_eos or seq.seq_id in self.matchers
            banned = tuple(params.stop_token_ids) + (() if allows_eos else tuple(self.eos_token_ids))
        return SamplingRow(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty, logit_bias=params.logit_bias,
            banned_token_ids=banned, num_logprobs=params.num_logprobs,
            generator=self._generator(seq),
            **self._penalty_counts(seq),
        )

    def _penalty_counts(self, seq: Sequence) -> dict[str, torch.Tensor]:
        """The sequence's token counts, updated with its tokens since the last step (no lists rebuilt)."""
        params = seq.params
        if not params.has_penalties:
            return {}
        counts = self.token_counts.get(seq.seq_id)
        if counts is None:
            counts = self.token_counts[seq.seq_id] = TokenCounts(
                seq, self.config.vocab_size, self.device, needs_prompt=params.repetition_penalty != 1.0)
        counts.update(seq)
        return {"prompt_counts": counts.prompt, "output_counts": counts.output}

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.is_greedy:
            return None
        generator = self.generators.get(seq.seq_id)
        if generator is None:
            # each choice of an n > 1 request gets its own, reproducible stream
            generator = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.index)
            self.generators[seq.seq_id] = generator
        return generator

    def add_matcher(self, seq: Sequence, matcher: GrammarMatcher) -> None:
        """Constrain the sequence's output from its next token on. The matcher lives as long as the
        sequence: a preempted sequence keeps it, since recomputing only rebuilds the KV cache."""
        self.matchers[seq.seq_id] = matcher

    def is_grammar_terminated(self, seq: Sequence) -> bool:
        """The sequence's grammar has accepted its end (an EOS where the grammar may end)."""
        matcher = self.matchers.get(seq.seq_id)
        return matcher is not None and matcher.is_terminated()

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state once the sequence has finished."""
        self.generators.pop(seq.seq_id, None)
        self.matchers.pop(seq.seq_id, None)
        self.token_counts.pop(seq.seq_id, None)
