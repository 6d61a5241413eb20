"""Fused projections: q, k and v as one matmul, and gate and up as another.

A decode step for one sequence is a few hundred small matmuls, and each call costs about as much
in dispatch as in arithmetic: stacking the weights that read the same input into one layer cuts
seven matmuls a layer to four. Every output row is computed exactly as before (a row of the
stacked weight is the row it came from), so results do not change. Like packing this is a module
swap after loading (`fuse_projections`, called by `prepare_for_inference`); the model uses a fused
layer when it has one.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral_serve.model.cpu.layouts import TORCH_INT4_ROW_BLOCK
from mistral_serve.model.quant import Int4Linear, Int8Linear


@torch.no_grad()
def stack_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the layers' outputs side by side (all of one kind, same input
    width); None when they cannot be stacked."""
    kind = type(layers[0])
    if any(type(layer) is not kind for layer in layers) or len({layer.in_features for layer in layers}) != 1:
        return None
    in_features, out_features = layers[0].in_features, sum(layer.out_features for layer in layers)
    if kind is nn.Linear:
        if any(layer.bias is not None for layer in layers):
            return None
        weight = layers[0].weight
        stacked = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        stacked.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        return stacked
    # int8 weights with a scale per row (W8A8's too), before packing: the packed layout is opaque
    if issubclass(kind, Int8Linear) and all(layer.packed_weight is None for layer in layers):
        stacked = kind(in_features, out_features, device="meta")  # buffers replaced just below
        stacked.weight = torch.cat([layer.weight for layer in layers])
        stacked.scales = torch.cat([layer.scales for layer in layers])
        return stacked
    # torch's int4 layout packs rows in blocks of 64: stacking packed weights is exact only per block
    if kind is Int4Linear and all(layer.out_features % TORCH_INT4_ROW_BLOCK == 0 for layer in layers):
        stacked = Int4Linear(in_features, out_features, dtype=layers[0].scales_and_zeros.dtype, device="meta")
        stacked.weight = torch.cat([layer.weight for layer in layers])
        stacked.scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)
        return stacked
    return None


def fuse_projections(model: nn.Module) -> int:
    """In every decoder layer, stack q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, in place,
    where their kinds allow (a model already fused is left as it is). Returns the layers fused."""
    num_fused = 0
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if attention.qkv_proj is None:
            attention.qkv_proj = stack_linears([attention.q_proj, attention.k_proj, attention.v_proj])
            if attention.qkv_proj is not None:
                del attention.q_proj, attention.k_proj, attention.v_proj
                num_fused += 1
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = stack_linears([mlp.gate_proj, mlp.up_proj])
            if mlp.gate_up_proj is not None:
                del mlp.gate_proj, mlp.up_proj
                num_fused += 1
    return num_fused
