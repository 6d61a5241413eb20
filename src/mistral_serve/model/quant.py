"""Weight-only int8 and int4 quantization, in two verbs as in gpt-fast: quantize a weight, and
swap the model's `nn.Linear`s for `Int8Linear`s or `Int4Linear`s. The model code knows nothing of
either. `W8A8Linear` quantizes the inputs too (int8 weights × int8 activations).

int8: each output row keeps its own scale (symmetric, absmax / 127), so a weight becomes
`int8 (out, in)` plus `scales (out,)` and `weight ≈ int8 * scales[:, None]`.

int4 (CPU only): each group of `group_size` inputs of an output row keeps a scale and an offset
(asymmetric, min..max in 16 steps): `weight ≈ (q - 8) * scale + zero`, q in 0..15, packed two to a
byte in the layout torch's CPU int4 kernel reads.
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


class W8A8Linear(nn.Module):
    """A bias-free linear layer computing in int8 on both sides (CPU only): the weight as in
    `Int8Linear` (a scale per output row), each input row quantized when it arrives (symmetric,
    absmax / 127: a scale per token), int32 products in oneDNN's kernel, rescaled to float.

    Unlike weight-only int8 its cost barely grows with the rows of a batch (16 rows of a
    4096x14336 layer: 3.2 ms, against 14 ms for torch's weight-only kernel, and about the same as it
    for one row), but the inputs lose precision too: an input row with one outlier feature
    quantizes its other features coarsely. Each row has its own scale, so a request's numbers never
    depend on the other requests in its batch."""

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        # float32 whatever the model's dtype: the kernel takes no other
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.packed_weight: torch.Tensor | None = None  # oneDNN's layout (opaque), once packed
        self.packed_nbytes = 0

    @torch.no_grad()
    def pack(self) -> None:
        """Lay the weight out for the kernel once; the plain copy is dropped (no second copy)."""
        if self.packed_weight is None:
            self.packed_weight = torch.ops.onednn.qlinear_prepack(self.weight, None)
            self.packed_nbytes = self.weight.nbytes
            self.weight = torch.empty(0, dtype=torch.int8)
            self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features).  Returns (..., out_features) in x's dtype."""
        self.pack()
        x2d = x.reshape(-1, self.in_features).float()  # (tokens, in)
        row_scales = x2d.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127  # (tokens, 1)
        # unsigned with zero point 128, as the kernel takes its inputs: symmetric in [1, 255]
        quantized = (x2d / row_scales).round_().add_(128).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(quantized, 1.0, 128, self.packed_weight, self.scales,
                                                 self.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        return (out * row_scales).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 inputs"


def swap_linears_for_int8(model: nn.Module, *, dtype: torch.dtype, exclude: Collection[str] = ()) -> set[str]:
    """Replace every bias-free `nn.Linear` of `model` (except the qualified names in `exclude`) by an
    empty `Int8Linear` on the same device; meant for a model built on the meta device, before
    its weights are loaded.  Returns the qualified names of the swapped modules."""
    return _swap_linears(model, exclude, lambda module: Int8Linear(
        module.in_features, module.out_features, dtype=dtype, device=module.weight.device))


def swap_linears_for_w8a8(model: nn.Module, *, exclude: Collection[str] = ()) -> set[str]:
    """As `swap_linears_for_int8`, with empty `W8A8Linear`s (their scales are float32)."""
    return _swap_linears(model, exclude, lambda module: W8A8Linear(
        module.in_features, module.out_features, device=module.weight.device))


def swap_linears_for_int4(model: nn.Module, *, dtype: torch.dtype, exclude: Collection[str] = ()) -> set[str]:
    """As `swap_linears_for_int8`, with empty `Int4Linear`s."""
    return _swap_linears(model, exclude, lambda module: Int4Linear(
        module.in_features, module.out_features, dtype=dtype, device=module.weight.device))


def _swap_linears(model: nn.Module, exclude: Collection[str], make) -> set[str]:
    swapped = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in exclude:
            continue
        if module.bias is not None:
            raise ValueError(f"{name}: int8 quantization supports only bias-free linear layers")
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, make(module))
        swapped.add(name)
    return swapped


# int4

_INT4_GROUP_SIZES = (128, 64, 32)  # the kernel's; the largest that divides a layer's width is used


def int4_group_size(in_features: int) -> int:
    for group_size in _INT4_GROUP_SIZES:
        if in_features % group_size == 0:
            return group_size
    raise ValueError(f"int4 quantization needs in_features divisible by 32, got {in_features}")


def quantize_int4(weight: torch.Tensor, scales_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: (out, in) float, on the CPU.  Returns (packed uint8 (out, in / 2), scales_and_zeros
    (in / group_size, out, 2)) in `scales_dtype` (default: the weight's dtype)."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.device.type != "cpu":
        raise ValueError(f"quantize_int4 expects a 2-D float CPU weight, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    out_features, in_features = weight.shape
    group_size = int4_group_size(in_features)
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    dtype = scales_dtype or weight.dtype
    # rounded to their stored dtype first, so q is chosen against the values the kernel will use
    scales = ((high - low).clamp(min=1e-6) / 15).to(dtype).float()
    zeros = (low + 8 * scales).to(dtype).float()
    q = (groups - zeros).div_(scales).add_(8).round_().clamp_(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_features, in_features), 1)
    scales_and_zeros = torch.cat((scales, zeros), dim=-1).transpose(0, 1).to(dtype).contiguous()
    return packed, scales_and_zeros


class Int4Linear(nn.Module):
    """A bias-free linear layer with a packed int4 weight and a scale and offset per group of inputs."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = int4_group_size(in_features)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // self.group_size, out_features, 2,
                                                             dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features).  Returns (..., out_features) in x's dtype."""
        x2d = x.reshape(-1, self.in_features).contiguous()  # (tokens, in)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.weight, self.group_size,
                                                         self.scales_and_zeros.to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scales={self.scales_and_zeros.dtype}")
