"""The Mistral / Llama decoder-only transformer, written against a paged KV cache.

Parameter names follow the Hugging Face layout without the `model.` prefix
(`layers.0.self_attn.q_proj.weight`, ...), and q/k rows use Hugging Face's rotary layout
(rotate-half); the loader converts other formats into this.

Inside the model, submodules are called through `.forward`, not `module(...)`: `nn.Module.__call__`
looks for hooks on every call (about 2 µs), a decode step of a 30-layer model makes ~275 such calls,
and for one sequence of the demo model that was 5% of the step. No hooks are set on these modules;
the model itself is still called as a module.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from mistral_serve.model.attention import AttentionMetadata, paged_attention, write_kv_cache
from mistral_serve.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the model dtype, as the reference does. torch.rms_norm, not
        # F.rms_norm: the functional wrapper's Python checks cost a third of this call for one token
        # (61 calls a decode step of a 30-layer model)
        return self.weight * torch.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in float32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device)
                                         .float() / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_positions, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
        # sin with rotate-half's sign folded in (its first half negated): see apply_rotary
        half_ones = torch.ones(self.head_dim // 2, device=device)
        signs = torch.cat((-half_ones, half_ones))
        self.cos_sin = torch.stack((emb.cos(), emb.sin() * signs))  # (2, max_positions, head_dim)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (as apply_rotary takes it) of the tokens' positions, each
        (tokens, 1, head_dim): looked up once per step, shared by every layer."""
        cos_sin = self.cos_sin[:, positions].to(dtype).unsqueeze(2)  # (2, tokens, 1, head_dim)
        return cos_sin[0], cos_sin[1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim), rotate-half layout; signed_sin: sin with its first half negated.

    rotate_half(x) * sin == x.roll(half) * signed_sin, exactly: one op instead of four (two slices,
    a negation, a concatenation), and every layer runs this once a step."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v stacked, once fused.py has fused them

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata):
        num_tokens = x.shape[0]
        cos, sin = rope
        if self.qkv_proj is not None:
            qkv = self.qkv_proj.forward(x).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            q_and_k = apply_rotary(qkv[:, :self.num_heads + self.num_kv_heads], cos, sin)  # one rotation for both
            q, k = q_and_k[:, :self.num_heads], q_and_k[:, self.num_heads:]
            v = qkv[:, self.num_heads + self.num_kv_heads:]
        else:
            q = apply_rotary(self.q_proj.forward(x).view(num_tokens, self.num_heads, self.head_dim), cos, sin)
            k = apply_rotary(self.k_proj.forward(x).view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
            v = self.v_proj.forward(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj.forward(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked, once fused.py has fused them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj.forward(x).chunk(2, dim=-1)
            return self.down_proj.forward(F.silu(gate) * up)
        return self.down_proj.forward(F.silu(self.gate_proj.forward(x)) * self.up_proj.forward(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.self_attn.forward(self.input_layernorm.forward(x), rope, kv_cache, meta)
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def tie_weights(self) -> None:
        """Share the embedding with a float output layer (a quantized one keeps its own copy)."""
        if self.config.tie_word_embeddings and type(self.lm_head) is nn.Linear:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """token_ids, positions: (num_tokens,).  Returns float32 logits (len(logits_indices), vocab)."""
        x = self.embed_tokens(token_ids)
        rope = self.rotary(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer.forward(x, rope, kv_cache, meta)
        x = self.norm(x[logits_indices])
        return self.lm_head(x).float()
