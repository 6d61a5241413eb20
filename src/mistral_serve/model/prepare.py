"""prepare_for_inference: the one place a loaded model is rewritten to run.

Loading and preparing are two verbs. Loading (checkpoints/loader.py) converts weights: it builds the
model and fills it with the checkpoint's tensors in the storage asked for, float or quantized tensor
by tensor as they are read (so the float weights never all exist at once). Preparing then swaps
modules for faster ones that compute the same numbers, in this order:

1. stack q/k/v and gate/up into one layer each (fused.py), while the weights are still plain;
2. pack every linear layer it can for our CPU kernels or the matmul library (cpu/packed.py, quant.py);
3. on the CPU in bfloat16, put norms, attention and MLP on our kernels (cpu/layers.py);
4. where every decoder layer is then on our kernels, build the decode step that runs them in one call.

The KV cache is not built here: the engine sizes it from its config and the runner owns it. The
fused decode step takes the caches per call, as the model's forward does, so a prepared model needs
to know nothing of the cache.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral_serve.model.cpu.kernels import CpuKernels, backend as kernel_backend
from mistral_serve.model.cpu.layers import FusedDecode, use_cpu_layers
from mistral_serve.model.cpu.packed import PackedLinear, pack_linears
from mistral_serve.model.fused import fuse_projections
from mistral_serve.model.mistral import Transformer
from mistral_serve.model.prepared import PreparedModel
from mistral_serve.model.quant import Int4Linear, Int8Linear


@torch.no_grad()
def prepare_for_inference(model: Transformer, device: torch.device, kernels: CpuKernels | None) -> PreparedModel:
    """Rewrite `model` (loaded on `device`) in place for inference. `kernels`: our CPU kernels, or None
    for torch's alone; unused off the CPU. Preparing a prepared model again changes nothing."""
    weight = model.embed_tokens.weight
    if weight.device.type != device.type:
        raise ValueError(f"the model's weights are on {weight.device}, not on {device}")
    if device.type != "cpu":
        kernels = None
    fuse_projections(model)
    pack_linears(model, kernels)
    on_cpu_layers = kernels is not None and use_cpu_layers(model, kernels)
    fused_decode = FusedDecode.build(model, kernels) if on_cpu_layers else None
    attention_kernels = kernels if kernels is not None and kernels.can_attend(model.config.head_dim,
                                                                              weight.dtype) else None
    return PreparedModel(model, weight.device, weight.dtype, attention_kernels, fused_decode,
                         kernels=_kernels(device, kernels),
                         kernel_path=_kernel_path(model, on_cpu_layers, attention_kernels, fused_decode))


def _kernels(device: torch.device, kernels: CpuKernels | None) -> str:
    """Which kernels run here, in a few words: ours (which instruction set, tile units or not), or torch's
    and why ours do not."""
    if device.type != "cpu":
        return f"torch's on {device.type}"
    found = kernel_backend()
    if kernels is None and found.is_available:
        return "torch's (ours were not given to this model)"
    return found.describe()


def _kernel_path(model: Transformer, on_cpu_layers: bool, attention_kernels: CpuKernels | None,
                 fused_decode: FusedDecode | None) -> str:
    linears = [module for module in model.modules()
               if isinstance(module, (nn.Linear, PackedLinear, Int8Linear, Int4Linear))]
    num_ours = sum(getattr(module, "kernels", None) is not None for module in linears)
    parts = [f"{num_ours} of {len(linears)} linear layers on our CPU kernels" if num_ours
             else "linear layers on torch's kernels"]
    if on_cpu_layers:
        parts.append("norms, rotary and MLP activation on ours")
    if attention_kernels is not None:
        parts.append("decode attention on ours")
    if fused_decode is not None:
        parts.append("decode steps in one call")
    return ", ".join(parts)
