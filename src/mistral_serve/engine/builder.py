"""Settings → a ready LLMEngine: pick the device, dtype and CPU threads, size the KV cache, load the
checkpoint."""

from __future__ import annotations

import os

import torch

from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.model.loader import load_model, resolve_checkpoint
from mistral_serve.settings import Settings
from mistral_serve.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but this machine has no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 (the dtype Mistral's weights are published in) on CUDA and on CPUs with native
    bfloat16 matmuls (AVX512-BF16, AMX); float32 on other CPUs, where bfloat16 is emulated and slow."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bfloat16()):
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def cpu_has_native_bfloat16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_threads(requested: int | None, *, shares_with_server: bool) -> int:
    """Threads for the engine's CPU work. Unset: $OMP_NUM_THREADS when given, else every core this
    process may use, less one when an HTTP server shares the process: the matmul threads wait for each
    other at every layer, so one of them losing its core to the server's event loop stalls all of them
    (measured here on 2 cores: a decode step 16 ms slower at 2 threads than at 1)."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = available_cores()
    return max(1, cores - 1) if shares_with_server else cores


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,
        kv_cache_memory=settings.kv_cache_memory_mb << 20,
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=settings.seed,
    )


def load_engine(source: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                quantize: str | None = None, config: EngineConfig = EngineConfig(),
                allow_download: bool = False) -> LLMEngine:
    """Load a checkpoint (a path, a Hugging Face id from the local cache, or "demo") into an engine."""
    path = resolve_checkpoint(source, allow_download=allow_download)
    model = load_model(path, dtype=dtype, device=device, quantize=quantize)
    return LLMEngine(model, load_tokenizer(path), config)


def build_engine(settings: Settings) -> LLMEngine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return load_engine(settings.model, dtype=dtype, device=str(device), quantize=settings.quantize,
                       config=engine_config(settings), allow_download=settings.allow_download)
