"""Decoder modules on our CPU kernels (cpu/kernels.c): RMSNorm, the rotary embedding with the KV-cache
write, and SiLU-and-multiply each become one call instead of several torch ops.

For one token of the demo model these small ops were a quarter of a decode step (RMSNorm alone is
eight torch ops on the CPU, ~30 us a call, twice a layer). Like fusing and packing this is a module
swap after loading (`use_cpu_layers`, called by `prepare_for_inference`); the model code does not know
about it. The kernels round to bfloat16 where the torch ops do, so the numbers are the model's up to
float32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral_serve.model.attention import AttentionMetadata, paged_attention
from mistral_serve.model.cpu.kernels import CpuKernels, DecoderShape, LayerWeights, LinearWeights
from mistral_serve.model.mistral import MLP, Attention, RMSNorm, Transformer
from mistral_serve.model.cpu.packed import PackedLinear
from mistral_serve.model.quant import Int4Linear


class CpuRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm, kernels: CpuKernels):
        super().__init__()
        self.weight, self.eps, self.kernels = norm.weight, norm.eps, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (tokens, hidden)
        return self.kernels.rms_norm(x2d, self.weight, self.eps).view(x.shape)


class CpuMLP(nn.Module):
    def __init__(self, mlp: MLP, kernels: CpuKernels):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.kernels = mlp.gate_up_proj, mlp.down_proj, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(self.kernels.silu_and_mul(self.gate_up_proj.forward(x).contiguous()))


class CpuAttention(nn.Module):
    def __init__(self, attention: Attention, kernels: CpuKernels):
        super().__init__()
        self.num_heads, self.num_kv_heads = attention.num_heads, attention.num_kv_heads
        self.head_dim, self.scale = attention.head_dim, attention.scale
        self.qkv_proj, self.o_proj, self.kernels = attention.qkv_proj, attention.o_proj, kernels

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata):
        num_tokens = x.shape[0]
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = self.qkv_proj.forward(x).contiguous().view(num_tokens, heads, self.head_dim)
        cos, signed_sin = rope  # (tokens, 1, head_dim) each
        k_cache, v_cache = kv_cache
        # q and k rotated in place, k and v written to their cache slots: one call
        self.kernels.rotary_and_cache(qkv, self.num_heads, self.num_kv_heads, cos.contiguous(),
                                      signed_sin.contiguous(), k_cache, v_cache, meta.slot_mapping.contiguous())
        q = qkv[:, :self.num_heads]
        k = qkv[:, self.num_heads:self.num_heads + self.num_kv_heads]
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj.forward(out.reshape(num_tokens, self.num_heads * self.head_dim))


def can_use_cpu_layers(model: Transformer) -> bool:
    """bfloat16 on the CPU, projections fused (fused.py), and widths the kernels take."""
    config, weight = model.config, model.embed_tokens.weight
    layer = model.layers[0]
    return (weight.device.type == "cpu" and CpuKernels.can_attend(config.head_dim, weight.dtype)
            and config.hidden_size % 16 == 0 and config.intermediate_size % 16 == 0
            and layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None)


def use_cpu_layers(model: Transformer, kernels: CpuKernels) -> bool:
    """Swap every decoder layer's norms, attention and MLP, and the final norm, for the modules above,
    in place, where `can_use_cpu_layers`. Returns whether it did."""
    if not can_use_cpu_layers(model):
        return False
    for layer in model.layers:
        if isinstance(layer.self_attn, CpuAttention):
            continue
        layer.input_layernorm = CpuRMSNorm(layer.input_layernorm, kernels)
        layer.post_attention_layernorm = CpuRMSNorm(layer.post_attention_layernorm, kernels)
        layer.self_attn = CpuAttention(layer.self_attn, kernels)
        layer.mlp = CpuMLP(layer.mlp, kernels)
    if not isinstance(model.norm, CpuRMSNorm):
        model.norm = CpuRMSNorm(model.norm, kernels)
    return True


class FusedDecode:
    """A step of single-token decodes through every decoder layer in one kernel call, for a model
    whose projections are all on our kernels (packed int4, or bfloat16 in our layout) and whose
    layers are the modules above: the same kernels in the same order, without ~300 Python calls a
    step between them. Built by `build`, which says None for any other model.

    The KV cache is not the model's: the runner allocates it, sized from the engine's config. So the
    step takes the caches per call, as `Transformer.forward` does, and writes their addresses into
    its layer table when it first sees them (again only when it is handed other caches)."""

    def __init__(self, model: Transformer, kernels: CpuKernels):
        self.model, self.kernels = model, kernels
        self.layers = (LayerWeights * len(model.layers))()
        for entry, layer in zip(self.layers, model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            entry.input_norm = layer.input_layernorm.weight.data_ptr()
            entry.post_attention_norm = layer.post_attention_layernorm.weight.data_ptr()
            entry.qkv, entry.o = _linear_weights(attention.qkv_proj), _linear_weights(attention.o_proj)
            entry.gate_up, entry.down = _linear_weights(mlp.gate_up_proj), _linear_weights(mlp.down_proj)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # those the layer table points at
        self.shape: DecoderShape | None = None  # set with the caches: it holds their block size

    @classmethod
    def build(cls, model: Transformer, kernels: CpuKernels) -> FusedDecode | None:
        def on_our_kernels(module) -> bool:
            return isinstance(module, (Int4Linear, PackedLinear)) and module.kernels is not None
        for layer in model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if not (isinstance(attention, CpuAttention) and isinstance(mlp, CpuMLP)
                    and isinstance(layer.input_layernorm, CpuRMSNorm)
                    and isinstance(layer.post_attention_layernorm, CpuRMSNorm)
                    and all(map(on_our_kernels, (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj,
                                              mlp.down_proj)))):
                return None
        return cls(model, kernels)

    def _bind(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # the kernel reads the caches through these pointers on every step, unchecked: check them once here
        config = self.model.config
        shape = kv_caches[0][0].shape  # (num_blocks, block_size, num_kv_heads, head_dim)
        if (len(kv_caches) != len(self.layers) or shape[2:] != (config.num_kv_heads, config.head_dim)
                or not all(cache.shape == shape and cache.dtype == torch.bfloat16 and cache.is_contiguous()
                           for pair in kv_caches for cache in pair)):
            raise ValueError(f"the fused decode step needs one pair of contiguous bfloat16 KV caches per layer, "
                             f"each (blocks, block size, {config.num_kv_heads}, {config.head_dim})")
        block_size = shape[1]
        self.shape = DecoderShape(config.hidden_size, config.intermediate_size, config.num_heads,
                                  config.num_kv_heads, config.head_dim, block_size, config.sliding_window or 0,
                                  config.rms_norm_eps, config.head_dim ** -0.5)
        for entry, (k_cache, v_cache) in zip(self.layers, kv_caches):
            entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        # the structures hold raw pointers: the tensors behind them live as long as the model and caches
        self.kv_caches = kv_caches

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                 logits_indices: torch.Tensor) -> torch.Tensor:
        """As Transformer.forward, for a step whose tokens are all single-token decodes."""
        if kv_caches is not self.kv_caches:
            self._bind(kv_caches)
        model = self.model
        x = model.embed_tokens(token_ids).contiguous()  # (num_decodes, hidden), updated in place
        cos, signed_sin = model.rotary(positions, x.dtype)
        self.kernels.decode_layers(self.layers, self.shape, x, cos.contiguous(), signed_sin.contiguous(),
                                   meta.slot_mapping.contiguous(), meta.decode_block_tables.contiguous(),
                                   meta.decode_context_lens.contiguous())
        return model.lm_head(model.norm(x[logits_indices])).float()


def _linear_weights(layer: Int4Linear | PackedLinear) -> LinearWeights:
    if isinstance(layer, PackedLinear):
        return LinearWeights(layer.packed_weight.data_ptr(), None, layer.out_features, layer.in_features, 0, 1)
    return LinearWeights(layer.weight.data_ptr(), layer.scales_and_zeros.data_ptr(), layer.out_features,
                         layer.in_features, layer.group_size, 0)
