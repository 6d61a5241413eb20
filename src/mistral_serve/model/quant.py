"""Weight-only int8 quantization, in two verbs as in gpt-fast: quantize a weight, and swap the
model's `nn.Linear`s for `Int8Linear`s. The model code knows nothing of either.

Each output row keeps its own scale (symmetric, absmax / 127), so a weight becomes
`int8 (out, in)` plus `scales (out,)` and `weight ≈ int8 * scales[:, None]`.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
import torch.nn.functional as F

# On CPU, torch's fused int8 kernel beats dequantize-then-matmul only for a few rows (decode
# batches), not for prefill chunks.  Measured on an AVX-512 CPU, torch 2.13, a 4096x4096 layer:
# bfloat16 wins up to ~64 rows; float32 and float16 take an unvectorized path (~20 ms a row)
# and win only up to ~3 rows, against ~70 ms to dequantize.
_KERNEL_MAX_ROWS = {torch.bfloat16: 32, torch.float32: 2, torch.float16: 2}
# The kernel crashes (segfault, torch 2.13) on bfloat16 inputs whose in_features is not a
# multiple of 16; every real model's widths are multiples of 64, so only take the kernel then.
_KERNEL_IN_FEATURES_MULTIPLE = 64


def quantize_int8(weight: torch.Tensor, scales_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: (out_features, in_features) float.  Returns (int8 weight (out, in), scales (out,)).

    Scales are stored in `scales_dtype` (default: the weight's dtype); the int8 values are rounded
    against the stored scales, so int8 * scales is as close to the weight as the storage allows.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8 expects a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    weight32 = weight.float()
    scales = (weight32.abs().amax(dim=1) / 127).to(scales_dtype or weight.dtype)  # (out,)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # an all-zero row stays zero
    steps = weight32 / scales.float()[:, None]  # (out, in); in place from here: one float copy at a time
    return steps.round_().clamp_(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight and one scale per output feature."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # buffers, not parameters: nothing here is trained
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features).  Returns (..., out_features) in x's dtype."""
        x2d = x.reshape(-1, self.in_features)  # (tokens, in)
        scales = self.scales.to(x.dtype)
        if self._can_use_int8_kernel(x2d):
            out = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight, scales)
        else:  # CUDA, or many rows: dequantize on the fly (torch.compile fuses this)
            out = F.linear(x2d, self.weight.to(x.dtype)) * scales
        return out.reshape(*x.shape[:-1], self.out_features)

    def _can_use_int8_kernel(self, x2d: torch.Tensor) -> bool:
        return (x2d.device.type == "cpu" and x2d.shape[0] <= _KERNEL_MAX_ROWS.get(x2d.dtype, 0)
                and self.in_features % _KERNEL_IN_FEATURES_MULTIPLE == 0 and self.weight.is_contiguous())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scales={self.scales.dtype}"


def swap_linears_for_int8(model: nn.Module, *, dtype: torch.dtype, exclude: Collection[str] = ()) -> set[str]:
    """Replace every bias-free `nn.Linear` of `model` (except the qualified names in `exclude`) by an
    empty `Int8Linear` on the same device; meant for a model built on the meta device, before
    its weights are loaded.  Returns the qualified names of the swapped modules."""
    swapped = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in exclude:
            continue
        if module.bias is not None:
            raise ValueError(f"{name}: int8 quantization supports only bias-free linear layers")
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, Int8Linear(module.in_features, module.out_features, dtype=dtype,
                                               device=module.weight.device))
        swapped.add(name)
    return swapped
