"""Attention over the paged KV cache.

The runner flattens one engine step into a single token dimension: first one token for each
decoding sequence, then the prefill chunks one after another. `AttentionMetadata` says where each
token's key and value go in the cache and which cached positions each query may see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    """A run of consecutive prompt tokens of one sequence."""

    token_start: int  # index of the chunk's first token in the step's flat token dimension
    num_tokens: int
    start_position: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # (num_blocks_of_sequence,) int64


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: flat cache slot of each new token
    num_decodes: int  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_num_blocks) int64, padded with 0
    decode_context_lens: torch.Tensor | None  # (num_decodes,) int64: tokens visible, the new one included
    prefills: tuple[PrefillChunk, ...]
    sliding_window: int | None


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
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = _decode_attention(q[:meta.num_decodes], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, chunk,
                                       meta.sliding_window, scale)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    block_tables, context_lens = meta.decode_block_tables, meta.decode_context_lens
    num_decodes, max_num_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    max_len = max_num_blocks * block_size
    # (num_decodes, num_kv_heads, max_len, head_dim)
    keys = k_cache[block_tables].view(num_decodes, max_len, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[block_tables].view(num_decodes, max_len, num_kv_heads, head_dim).transpose(1, 2)
    key_positions = torch.arange(max_len, device=q.device)
    visible = key_positions[None, :] < context_lens[:, None]  # (num_decodes, max_len)
    if meta.sliding_window is not None:
        query_positions = context_lens - 1
        visible &= key_positions[None, :] > (query_positions - meta.sliding_window)[:, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=visible[:, None, None, :], scale=scale,
        enable_gqa=True)  # (num_decodes, num_heads, 1, head_dim)
    return out.squeeze(2)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: PrefillChunk,
                       sliding_window: int | None, scale: float) -> torch.Tensor:
    num_tokens, start = chunk.num_tokens, chunk.start_position
    context_len = start + num_tokens
    if start:  # earlier chunks or a prefix-cache hit: read the whole context back from the cache
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        num_blocks = -(-context_len // block_size)
        blocks = chunk.block_table[:num_blocks]
        k = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
        v = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
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
