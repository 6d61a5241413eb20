"""CPU linear layers with their weight pre-packed once: into our bfloat16 kernel's layout
(cpu/kernels.c) where it runs, else the matmul library's blocked layout.

A plain bfloat16 `F.linear` on the CPU re-lays the weight out on every call (and takes a slow
path for a single row); a weight packed once at start-up skips that, which roughly halves the
time of a decode step's matmuls; our kernel, which streams the weight once, makes one row another
1.6-2x faster (16 rows: about the same). Like quantization this is a module swap done after loading
(`pack_linears`, called by `prepare_for_inference`); the model code does not know about it. float32
keeps `F.linear`: its kernel already reads the weight in place, and keeping it keeps float32 results
bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral_serve.model.cpu.kernels import CpuKernels
from mistral_serve.model.cpu.layouts import TILE_ROWS, bf16_layout
from mistral_serve.model.precision import cpu_has_native_bfloat16
from mistral_serve.model.quant import Int4Linear, Int8Linear

# the row count the packed layout is tuned for: a decode batch; other counts run on it too
_PACKED_FOR_ROWS = 16


def can_pack(weight: torch.Tensor) -> bool:
    """A bfloat16 weight on a CPU whose matmul library has native bfloat16 kernels."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and cpu_has_native_bfloat16()


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight lives only in a packed layout: our bfloat16 kernel's
    (cpu/kernels.c, which streams the weight once at close to the memory's speed: one row of the
    demo model's 3072x576 layer 161 against 261 us on the matmul library's, of a 14336x4096 layer
    3.0 against 5.0 ms) where it runs (`kernels` given, and the layer's widths fit it), else the matmul
    library's (opaque)."""

    def __init__(self, weight: torch.Tensor, kernels: CpuKernels | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.kernels = (kernels if kernels is not None and self.out_features % TILE_ROWS == 0
                        and self.in_features % 4 == 0 else None)
        # a plain attribute, not a buffer: an opaque tensor has no storage to save, share or move
        self.packed_weight = (bf16_layout(weight.detach()) if self.kernels is not None
                              else torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKED_FOR_ROWS))
        self.packed_nbytes = weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) in the weight's dtype.  Returns (..., out_features)."""
        x2d = x.reshape(-1, self.in_features)  # (tokens, in)
        if x2d.dtype != self.dtype:
            raise ValueError(f"a {self.dtype} packed linear layer got {x2d.dtype} input")
        if self.kernels is not None:
            out = self.kernels.bf16_linear(x2d.contiguous(), self.packed_weight, self.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2d.contiguous(), self.packed_weight, None, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed"


@torch.no_grad()
def pack_linears(model: nn.Module, kernels: CpuKernels | None) -> set[str]:
    """Replace every bias-free `nn.Linear` whose weight `can_pack` by a `PackedLinear`, in place,
    pack the weights of CPU `Int8Linear`s (W8A8's too) for oneDNN's int8 matmul and those of
    `Int4Linear`s for our int4 kernel (where `kernels` is given). A weight shared
    with another module (a tied LM head) is packed into a copy of its own; the original stays for the
    other module. Returns the qualified names of the swapped modules."""
    swapped = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, (Int8Linear, Int4Linear)):
            if module.can_pack(kernels):
                module.pack(kernels)
            continue
        if type(module) is not nn.Linear or module.bias is not None or not can_pack(module.weight):
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, PackedLinear(module.weight, kernels))
        swapped.add(name)
    return swapped
