"""Settings → a ready LLMEngine: pick the device, dtype and CPU threads, load the checkpoint and
prepare the model for inference (with our CPU kernels, fetched here only), size the KV cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import logging
import os

import torch

from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.model.checkpoints.loader import load_model, resolve_checkpoint
from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.mistral import Transformer
from mistral_serve.model.precision import resolve_dtype
from mistral_serve.model.prepare import prepare_for_inference
from mistral_serve.model.prepared import PreparedModel
from mistral_serve.settings import Settings
from mistral_serve.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but this machine has no CUDA device")
    return device


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_threads(requested: int | None) -> int:
    """Threads for the engine's CPU work. Unset: $OMP_NUM_THREADS when given, else every core this
    process may use (the HTTP server's event loop needs little, and the matmul threads only wait
    for it if they come from more than one thread: see async_engine.py)."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return available_cores()


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
    return LLMEngine(prepare_model(model), load_tokenizer(path), config)


def prepare_model(model: Transformer) -> PreparedModel:
    """`prepare_for_inference` on the device the model was loaded on, with our CPU kernels there
    (built on first use; None where they cannot run)."""
    device = model.embed_tokens.weight.device
    kernels = cpu_kernels.load() if device.type == "cpu" else None
    prepared = prepare_for_inference(model, device, kernels)
    logger.info("model ready on %s, %s; kernels: %s; %s", device, str(prepared.dtype).removeprefix("torch."),
                prepared.kernels, prepared.kernel_path)
    return prepared


def build_engine(settings: Settings) -> LLMEngine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return load_engine(settings.model, dtype=dtype, device=str(device), quantize=settings.quantize,
                       config=engine_config(settings), allow_download=settings.allow_download)


def build_engine_on_its_thread(settings: Settings, num_threads: int) -> tuple[LLMEngine, ThreadPoolExecutor]:
    """Load the engine on a new one-thread executor, with `num_threads` CPU threads, and return both:
    its loop is to run on that same thread (see async_engine.py for why)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def build() -> LLMEngine:
        torch.set_num_threads(num_threads)  # OpenMP's thread count is per thread: set it on this one
        return build_engine(settings)
    try:
        return executor.submit(build).result(), executor
    except BaseException:
        executor.shutdown(wait=False)
        raise
