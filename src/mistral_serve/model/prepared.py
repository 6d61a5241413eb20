"""PreparedModel: a loaded model made ready to run, as `prepare_for_inference` hands it to the runner.

A module of its own, apart from prepare.py, so that the runner can name these types without
importing the code that rewrites a model (fusing, packing, quantized and kernel-backed layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mistral_serve.model.attention import AttentionMetadata
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.cpu.kernels import CpuKernels
from mistral_serve.model.mistral import Transformer


class DecodeStep(Protocol):
    """A forward pass for steps whose tokens are all single-token decodes, called as
    `Transformer.forward` is; `model` is the model it runs."""

    model: Transformer

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                 logits_indices: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PreparedModel:
    model: Transformer  # rewritten in place for inference: run it through the runner only
    device: torch.device
    dtype: torch.dtype  # of the activations, and so of the KV cache
    # decode attention on our CPU kernels, in place in the cache, where they take this model's heads
    attention_kernels: CpuKernels | None
    fused_decode: DecodeStep | None  # a decode-only step in one kernel call, where the model allows it
    kernels: str  # which kernels this process runs here: ours (instruction set, tile units) or torch's and why
    kernel_path: str  # which parts of the model run on our kernels, in a few words

    @property
    def config(self) -> ModelConfig:
        return self.model.config
