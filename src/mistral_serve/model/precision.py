"""The precisions a model is served in: dtype names, quantizations, and the CPU bfloat16 probe.

The one home of these facts: the settings, the command line, the loader and the builder read them
here. The choices are plain strings and torch is imported only by the functions, so the settings
and the command line can read them without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the names of torch's dtypes: torch.float32, …
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # "auto": see `resolve_dtype`
QUANTIZATIONS = ("int8", "int4", "w8a8")  # or None: the checkpoint's weights in the chosen dtype
CPU_ONLY_QUANTIZATIONS = ("int4", "w8a8")


def torch_dtype(name: str) -> torch.dtype:
    """One of DTYPE_NAMES → its torch dtype."""
    import torch
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def is_supported_dtype(dtype: torch.dtype) -> bool:
    return str(dtype).removeprefix("torch.") in DTYPE_NAMES


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 (the dtype Mistral's weights are published in) on CUDA and on CPUs with native
    bfloat16 matmuls (AVX512-BF16, AMX); float32 on other CPUs, where bfloat16 is emulated and slow."""
    import torch
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bfloat16()):
            return torch.bfloat16
        return torch.float32
    return torch_dtype(name)


def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU's matmul library (oneDNN) has native bfloat16 kernels on this CPU."""
    import torch
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
