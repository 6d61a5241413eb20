"""Attention over the paged KV cache.

The runner flattens one engine step into a single token dimension: first one token for each
decoding sequence, then the prefill chunks one after another. `AttentionMetadata` says where each
token's key and value go in the cache and which cached positions each query may see.

Decode on the CPU in bfloat16 runs our kernel (cpu/kernels.c), which reads each key and value in
place from its cache block: nothing is gathered or copied. Elsewhere decode reads the cache through
`DecodeLayout`, built once per step and shared by every layer: the flat cache slot of each visible
key position of each decoding sequence, and a mask for padding and the sliding window. Each layer
then gathers exactly those slots with one `index_select` (a row copy) for SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mistral_serve.model.cpu.kernels import CpuKernels


@dataclass(frozen=True)
class PrefillChunk:
    """A run of consecutive prompt tokens of one sequence."""

    token_start: int  # index of the chunk's first token in the step's flat token dimension
    num_tokens: int
    start_position: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # (num_blocks_of_sequence,) int64


@dataclass(frozen=True)
class DecodeLayout:
    """Where the keys of each decoding sequence live: one padded row of cache slots per sequence."""

    slots: torch.Tensor  # (num_decodes * max_len,) int64: flat cache slots, padding points at slot 0
    # (num_decodes, 1, 1, max_len), added to the scores: 0 where the key is visible to the sequence's
    # query, -inf where not; None when every key is visible. Additive in the queries' dtype, as SDPA
    # would otherwise convert a boolean mask again in every layer.
    mask: torch.Tensor | None
    max_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: flat cache slot of each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_num_blocks) int64, padded with 0
    decode_context_lens: torch.Tensor | None  # (num_decodes,) int64: tokens visible, the new one included
    prefills: tuple[PrefillChunk, ...]
    sliding_window: int | None
    decode_layout: DecodeLayout | None = None  # built from the tables when None
    # our CPU kernels, when decode attention runs on them (then no DecodeLayout is needed)
    kernels: CpuKernels | None = None

    def layout(self, block_size: int, dtype: torch.dtype) -> DecodeLayout:
        return self.decode_layout or decode_layout(self.decode_block_tables, self.decode_context_lens,
                                                   block_size, self.sliding_window, dtype=dtype)


def decode_layout(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                  sliding_window: int | None, max_len: int | None = None, min_len: int | None = None,
                  dtype: torch.dtype = torch.float32) -> DecodeLayout:
    """block_tables: (num_decodes, max_num_blocks), context_lens: (num_decodes,), on the cache's device.
    `max_len` and `min_len` (the longest and shortest context, known to the caller as Python ints)
    avoid reading them back; with both, a step whose keys are all visible gets no mask. `dtype`: the
    queries'."""
    num_decodes, max_num_blocks = block_tables.shape
    if max_len is None:
        max_len = max_num_blocks * block_size
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :, None] * block_size + offsets).view(num_decodes, -1)[:, :max_len]
    key_positions = torch.arange(max_len, device=block_tables.device)
    visible = key_positions[None, :] < context_lens[:, None]  # (num_decodes, max_len)
    if sliding_window is not None:
        visible &= key_positions[None, :] > (context_lens - 1 - sliding_window)[:, None]
    slots = slots.masked_fill(~visible, 0)  # padding reads a valid slot; the mask hides it
    all_visible = min_len == max_len and (sliding_window is None or max_len <= sliding_window)
    mask = None
    if not all_visible:
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None, None, :]
    return DecodeLayout(slots.reshape(-1), mask, max_len)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the step's new keys and values in their slots.  k, v: (num_tokens, num_kv_heads, head_dim)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: (num_tokens, num_heads, head_dim); k, v: this step's (num_tokens, num_kv_heads, head_dim),
    already written to the cache.  Returns (num_tokens, num_heads, head_dim)."""
    num_decodes = meta.num_decodes
    if num_decodes and not meta.prefills:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = _decode_attention(q[:num_decodes], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk,
                                       meta.sliding_window, scale)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if meta.kernels is not None:
        return meta.kernels.paged_decode_attention(q.contiguous(), k_cache, v_cache, meta.decode_block_tables,
                                                   meta.decode_context_lens, meta.sliding_window, scale)
    layout = meta.layout(k_cache.shape[1], q.dtype)
    num_decodes, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    # (num_decodes, num_kv_heads, max_len, head_dim)
    keys = (k_cache.view(-1, num_kv_heads, head_dim).index_select(0, layout.slots)
            .view(num_decodes, layout.max_len, num_kv_heads, head_dim).transpose(1, 2))
    values = (v_cache.view(-1, num_kv_heads, head_dim).index_select(0, layout.slots)
              .view(num_decodes, layout.max_len, num_kv_heads, head_dim).transpose(1, 2))
    # the query heads of one KV head attend together: (num_decodes, num_kv_heads, group, head_dim)
    queries = q.view(num_decodes, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.mask, scale=scale)
    return out.reshape(num_decodes, num_heads, head_dim)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                       sliding_window: int | None, scale: float) -> torch.Tensor:
    num_tokens, start = chunk.num_tokens, chunk.start_position
    context_len = start + num_tokens
    if start:  # earlier chunks or a prefix-cache hit: read the whole context back from the cache
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        num_blocks = -(-context_len // block_size)
        blocks = chunk.block_table[:num_blocks]
        k = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:context_len]
        v = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:context_len]
    query_positions = torch.arange(start, context_len, device=q.device)
    key_positions = torch.arange(context_len, device=q.device)
    needs_mask = start > 0 or (sliding_window is not None and context_len > sliding_window)
    mask = None
    if needs_mask:
        mask = key_positions[None, :] <= query_positions[:, None]
        if sliding_window is not None:
            mask &= key_positions[None, :] > (query_positions[:, None] - sliding_window)
    # (1, heads, tokens, head_dim) layout for SDPA
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=not needs_mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
