"""Weight-only int8 and int4 quantization, in two verbs as in gpt-fast: quantize a weight, and
swap the model's `nn.Linear`s for `Int8Linear`s or `Int4Linear`s. The model code knows nothing of
either. On the CPU a packed `Int8Linear` multiplies in int8 on both sides, its inputs split into two
int8 passes that keep about 16 bits; `W8A8Linear` keeps one pass (8 bits: less precise, faster for batches).

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

from mistral_serve.model.cpu.kernels import CpuKernels
from mistral_serve.model.cpu.layouts import TILE_ROWS, TORCH_INT4_ROW_BLOCK, int4_layout, int8_layout

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


def can_pack_int8() -> bool:
    """Whether this build of torch has oneDNN's int8 matmul for the CPU (`Int8Linear.pack`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight and one scale per output feature.

    Packed (`pack`, CPU only; `prepare_for_inference` does it after loading), the weight moves into the
    layout of our int8 x int8 kernel (cpu/kernels.c; oneDNN's int8 matmul where ours cannot be
    built), which runs on the CPU's int8 dot-product instructions, and the plain copy is dropped.
    Each input row then goes in as int8 rows (`_quantize_rows`): with `input_passes = 2` (here) a
    coarse row and the row of what the coarse one missed, so an input keeps about 16 bits (error at
    most 1/64516 of its row's largest feature; bfloat16 itself keeps 8), while torch's weight-only
    kernel, the unpacked path, reads the whole weight again for every few rows of a batch. Measured
    on a 2-core AVX-512 CPU, a 4096x28672 layer: 4.6 ms for one row on the weight-only kernel, 3-4 ms
    packed; 16 rows 12 ms on our kernel, 26 on oneDNN's.
    """

    input_passes = 2

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # buffers, not parameters: nothing here is trained
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.packed_weight: torch.Tensor | None = None  # our kernel's layout or oneDNN's (opaque), once packed
        self.packed_nbytes = 0
        self.kernels: CpuKernels | None = None  # once packed for our kernel

    def can_pack(self, kernels: CpuKernels | None) -> bool:
        """Whether `pack(kernels)` can lay this weight out: for our kernels, else oneDNN's int8 matmul."""
        return self.weight.device.type == "cpu" and (self._fits_our_kernel(kernels) or can_pack_int8())

    def _fits_our_kernel(self, kernels: CpuKernels | None) -> bool:
        return kernels is not None and self.out_features % TILE_ROWS == 0 and self.in_features % 4 == 0

    @torch.no_grad()
    def pack(self, kernels: CpuKernels | None) -> None:
        """Lay the weight out for our int8 kernel (or, where it cannot run, oneDNN's int8 matmul) once
        and drop the plain copy (no second copy); the scales stay, plus a float32 copy for the kernel."""
        if self.packed_weight is not None:
            return
        if not self.can_pack(kernels):
            raise RuntimeError("int8 packing needs a CPU weight and our CPU kernels or torch built with oneDNN")
        self.kernel_scales = self.scales.float()
        if self._fits_our_kernel(kernels):
            self.packed_weight, self.weight_sums = int8_layout(self.weight)
            self.kernels = kernels
        else:
            self.packed_weight = torch.ops.onednn.qlinear_prepack(self.weight, None)
            self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        self.packed_nbytes = self.weight.nbytes
        self.weight = torch.empty(0, dtype=torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features).  Returns (..., out_features) in x's dtype."""
        x2d = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.kernels is not None:
            kernel_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
            out = self.kernels.int8_linear(x2d.to(kernel_dtype).contiguous(), self.packed_weight,
                                           self.kernel_scales, self.weight_sums, self.input_passes).to(x.dtype)
        elif self.packed_weight is not None:
            out = self._packed_matmul(x2d)
        elif self._can_use_int8_kernel(x2d):
            out = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight, self.scales.to(x.dtype))
        else:  # CUDA, or many rows: dequantize on the fly (torch.compile fuses this)
            out = F.linear(x2d, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _packed_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        num_rows = x2d.shape[0]
        quantized, row_scales, pass_weights = _quantize_rows(x2d, self.input_passes)
        out = torch.ops.onednn.qlinear_pointwise(quantized, 1.0, _ZERO_POINT, self.packed_weight,
                                                 self.kernel_scales, self.zero_points, None, 1.0, 0,
                                                 torch.float32, "none", [], "")  # (padded rows, out)
        combined = out[:num_rows]
        for index, weight in enumerate(pass_weights[1:], start=1):
            combined = combined.add(out[index * num_rows:(index + 1) * num_rows], alpha=weight)
        return (combined * row_scales).to(x2d.dtype)

    def _can_use_int8_kernel(self, x2d: torch.Tensor) -> bool:
        return (x2d.device.type == "cpu" and x2d.shape[0] <= _KERNEL_MAX_ROWS.get(x2d.dtype, 0)
                and self.in_features % _KERNEL_IN_FEATURES_MULTIPLE == 0 and self.weight.is_contiguous())

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed_weight is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scales={self.scales.dtype}, "
                f"{self.input_passes}-pass int8 inputs{packed}")


class W8A8Linear(Int8Linear):
    """`Int8Linear` with inputs of a single int8 pass (CPU only, runs packed only): each input row keeps
    8 bits against its largest feature (symmetric, absmax / 127: a scale per token), so an input row
    with one outlier feature quantizes its other features coarsely. Its cost barely grows with the
    rows of a batch, as the packed `Int8Linear`'s, and is lower for batches (half the input rows).
    Each row has its own scale, so a request's numbers never depend on the other requests in its
    batch. Its scales are float32: the kernel takes no other."""

    input_passes = 1

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unpacked, the parent would run a weight-only matmul: other numbers than this layer promises
        if self.packed_weight is None:
            raise RuntimeError("a W8A8 layer runs packed only: prepare the model for inference first")
        return super().forward(x)


# int8 inputs go to the kernel unsigned with this zero point: symmetric steps -127..127 in 1..255
_ZERO_POINT = 128
# the kernel picks a slow path for 1 to 3 rows (a 4096x28672 layer: 4.5 ms for 2 rows, 3.1 for 4)
_MIN_KERNEL_ROWS = 4


def _quantize_rows(x2d: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Split each row into `passes` int8 rows: the first one the row in steps of its largest
    feature / 127, each next one what the previous ones missed, in steps 254 times finer (a
    remainder is at most half a step). Returns (uint8 rows: pass after pass, zero point 128, padded
    with zeros to at least `_MIN_KERNEL_ROWS`, the row scales (rows, 1) float32, and the weight of
    each pass) such that row ≈ row_scale * sum(weight_p * (pass_p - 128))."""
    steps = x2d.float()
    row_scales = steps.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30) / 127  # (rows, 1)
    steps = steps / row_scales  # in [-127, 127]
    parts, pass_weights = [], []
    for index in range(passes):
        part = steps.round()
        parts.append(part)
        pass_weights.append(254.0 ** -index)
        if index + 1 < passes:
            steps = (steps - part).mul_(254)  # the remainder, in [-0.5, 0.5] steps, scaled to [-127, 127]
    padding = _MIN_KERNEL_ROWS - passes * x2d.shape[0]
    if padding > 0:
        parts.append(steps.new_zeros(padding, x2d.shape[1]))
    quantized = torch.cat(parts).add_(_ZERO_POINT).to(torch.uint8)
    return quantized, row_scales, pass_weights


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
    """A bias-free linear layer with a packed int4 weight and a scale and offset per group of inputs.

    Packed (`pack`, CPU with bfloat16 scales; `prepare_for_inference` does it after loading), the weight moves
    into the layout of our own kernel (cpu/kernels.c), which reads a decode step's weights near the
    memory's speed where torch's int4 kernel is bound by its instructions: measured on a 2-core
    AVX-512 CPU, one row of a 3072x576 layer 27 against 53 us, of a 28672x4096 layer 1.3 against
    3.1 ms. Same numbers up to float32 rounding: the weights and bfloat16 inputs are multiplied
    exactly and summed in float32 by both.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = int4_group_size(in_features)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // self.group_size, out_features, 2,
                                                             dtype=dtype, device=device))
        self.kernels: CpuKernels | None = None  # once packed for our kernel

    def can_pack(self, kernels: CpuKernels | None) -> bool:
        return (kernels is not None and self.weight.device.type == "cpu"
                and self.scales_and_zeros.dtype == torch.bfloat16 and self.out_features % TORCH_INT4_ROW_BLOCK == 0)

    @torch.no_grad()
    def pack(self, kernels: CpuKernels | None) -> None:
        """Move the weight, scales and zeros into our kernel's layout (no second copy is kept)."""
        if self.kernels is not None:
            return
        if not self.can_pack(kernels):
            raise RuntimeError("int4 packing needs a CPU layer with bfloat16 scales, out_features a multiple "
                               f"of {TORCH_INT4_ROW_BLOCK}, and the CPU kernels")
        self.weight, self.scales_and_zeros = int4_layout(self.weight, self.scales_and_zeros, self.group_size)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features).  Returns (..., out_features) in x's dtype."""
        # the model's own calls are 2-D already: no reshaping there (two reshapes were ~0.4 ms of a
        # 10 ms demo decode step); the torch.* binding, not torch.ops.aten.*, for the same reason
        is_2d = x.dim() == 2
        x2d = x if is_2d else x.reshape(-1, self.in_features)  # (tokens, in)
        if self.kernels is not None:
            out = self.kernels.int4_linear(x2d.to(torch.bfloat16).contiguous(), self.weight, self.scales_and_zeros,
                                           self.group_size, self.out_features).to(x.dtype)
        else:
            scales_and_zeros = self.scales_and_zeros
            if scales_and_zeros.dtype != x.dtype:
                scales_and_zeros = scales_and_zeros.to(x.dtype)
            out = torch._weight_int4pack_mm_for_cpu(x2d.contiguous(), self.weight, self.group_size, scales_and_zeros)
        return out if is_2d else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        packed = ", packed for our kernel" if self.kernels is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scales={self.scales_and_zeros.dtype}{packed}")
