"""Our CPU kernels (kernels.c): int4, int8 and bfloat16 matmuls, decode attention over the
paged cache, the small per-layer ops, and a whole decode step; built once with the machine's C
compiler, cached, and called through ctypes (which lets go of the GIL during a call).

They are an accelerator, never a requirement: where the library cannot be had (no C compiler, a CPU
without AVX-512 bfloat16 and int8 dot products, not Linux on x86-64, or MISTRAL_SERVE_CPU_KERNELS=0)
`load()` says why in the log and returns None, and the model keeps torch's own kernels. On CPUs with
tile units (Intel's AMX) the int8 and bfloat16 matmuls of 2 rows and more run on them
(MISTRAL_SERVE_AMX=0 keeps them on the vector loops).

The library is cached under $XDG_CACHE_HOME/mistral-serve/kernels (~/.cache by default), named by
a hash of its source, compiler and flags, so a changed source or compiler builds a new one. It
links against the libgomp torch has loaded, so the kernels' parallel loops run on torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-std=gnu11", "-fopenmp", "-shared", "-fPIC")
DISABLE_VARIABLE = "MISTRAL_SERVE_CPU_KERNELS"
AMX_VARIABLE = "MISTRAL_SERVE_AMX"


class LinearWeights(ctypes.Structure):
    """An int4 or bfloat16 layer in our kernels' layout (kernels.c)."""

    _fields_ = [("weight", ctypes.c_void_p), ("scales_offsets", ctypes.c_void_p), ("out_features", ctypes.c_int64),
                ("in_features", ctypes.c_int64), ("group_size", ctypes.c_int64), ("is_bf16", ctypes.c_int64)]


class LayerWeights(ctypes.Structure):
    """A decoder layer's norms and projections, and its KV cache."""

    _fields_ = [("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p), ("qkv", LinearWeights),
                ("o", LinearWeights), ("gate_up", LinearWeights), ("down", LinearWeights),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class DecoderShape(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("inner", ctypes.c_int64), ("num_heads", ctypes.c_int64),
                ("num_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("block_size", ctypes.c_int64),
                ("window", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class CpuKernels:
    """The loaded library: one method per kernel, on CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

        def bind(name: str, restype, *argtypes):
            function = getattr(library, name)
            function.argtypes, function.restype = list(argtypes), restype
            return function
        # (…, num_threads): every kernel takes torch's thread count last
        self._int4_linear = bind("ms_int4_linear", integer, pointer, size, size, pointer, pointer, size, size, pointer,
                                 integer)
        self._int8_linear = bind("ms_int8_linear", integer, pointer, size, size, pointer, pointer, pointer, size,
                                 integer, pointer, integer, integer)
        self._bf16_linear = bind("ms_bf16_linear", integer, pointer, size, size, pointer, size, pointer, integer)
        self._paged_decode_attention = bind("ms_paged_decode_attention", None, pointer, pointer, pointer, pointer,
                                            size, pointer, *[size] * 6, ctypes.c_float, pointer, integer)
        self._rms_norm = bind("ms_rms_norm", None, pointer, size, size, pointer, ctypes.c_float, pointer, integer)
        self._silu_and_mul = bind("ms_silu_and_mul", None, pointer, size, size, pointer, integer)
        self._rotary_and_cache = bind("ms_rotary_and_cache", None, pointer, *[size] * 4, *[pointer] * 5, integer)
        self._enable_amx = bind("ms_enable_amx", integer, integer)
        self.amx = False
        self._decode_layers = bind("ms_decode_layers", integer, ctypes.POINTER(LayerWeights), size,
                                   ctypes.POINTER(DecoderShape), pointer, size, *[pointer] * 4, size, pointer, integer)

    def int4_linear(self, x: torch.Tensor, weight: torch.Tensor, scales_offsets: torch.Tensor, group_size: int,
                    out_features: int) -> torch.Tensor:
        """x: (rows, in) bfloat16, contiguous; weight and scales_offsets from `int4_layout`.
        Returns (rows, out_features) bfloat16."""
        rows, in_features = x.shape
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
        if self._int4_linear(x.data_ptr(), rows, in_features, weight.data_ptr(), scales_offsets.data_ptr(),
                             out_features, group_size, out.data_ptr(), torch.get_num_threads()):
            raise MemoryError("the int4 kernel could not allocate its scratch space")
        return out

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, weight_sums: torch.Tensor,
                    input_passes: int) -> torch.Tensor:
        """x: (rows, in) bfloat16 or float32, contiguous; weight from `int8_layout`, scales (out,) float32,
        weight_sums (out,) int32. Returns (rows, out) in x's dtype."""
        rows, in_features = x.shape
        out = torch.empty(rows, scales.shape[0], dtype=x.dtype)
        if self._int8_linear(x.data_ptr(), rows, in_features, weight.data_ptr(), scales.data_ptr(),
                             weight_sums.data_ptr(), scales.shape[0], input_passes, out.data_ptr(),
                             x.dtype == torch.float32, torch.get_num_threads()):
            raise MemoryError("the int8 kernel could not allocate its scratch space")
        return out

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, sliding_window: int | None,
                               scale: float) -> torch.Tensor:
        """q: (num_decodes, num_heads, head_dim) bfloat16; caches (num_blocks, block_size, num_kv_heads,
        head_dim) bfloat16; block_tables (num_decodes, width) int64; context_lens (num_decodes,) int64,
        all contiguous. Returns (num_decodes, num_heads, head_dim) bfloat16."""
        num_decodes, num_heads, head_dim = q.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        out = torch.empty_like(q)
        self._paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                     block_tables.shape[1], context_lens.data_ptr(), sliding_window or 0,
                                     num_decodes, num_heads, num_kv_heads, head_dim, block_size, scale,
                                     out.data_ptr(), torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: (rows, dim) bfloat16, contiguous, dim % 16 == 0; weight (dim,) bfloat16. As the model's
        RMSNorm: weight * bf16(x * rsqrt(mean(x²) + eps)), in float32 inside."""
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr(),
                       torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: (rows, 2 * inner) bfloat16, contiguous, inner % 16 == 0. Returns silu(gate) * up."""
        rows, inner = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inner, dtype=gate_up.dtype)
        self._silu_and_mul(gate_up.data_ptr(), rows, inner, out.data_ptr(), torch.get_num_threads())
        return out

    def rotary_and_cache(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                         signed_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
        """qkv: (rows, num_heads + 2 * num_kv_heads, head_dim) bfloat16, contiguous: its q and k heads
        rotated in place (cos, signed_sin: (rows, head_dim), as the model's rotary gives them), then
        each row's k and v copied into the caches at slot_mapping[row]."""
        rows, _, head_dim = qkv.shape
        self._rotary_and_cache(qkv.data_ptr(), rows, num_heads, num_kv_heads, head_dim, cos.data_ptr(),
                               signed_sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
                               torch.get_num_threads())

    def bf16_linear(self, x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
        """x: (rows, in) bfloat16, contiguous; weight from `bf16_layout`. Returns (rows, out) bfloat16."""
        rows, in_features = x.shape
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
        if self._bf16_linear(x.data_ptr(), rows, in_features, weight.data_ptr(), out_features, out.data_ptr(),
                             torch.get_num_threads()):
            raise MemoryError("the bfloat16 kernel could not allocate its scratch space")
        return out

    def decode_layers(self, layers, shape: DecoderShape, x: torch.Tensor, cos: torch.Tensor,
                      signed_sin: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor) -> None:
        """Every layer of `layers` (a LayerWeights array) on x (num_decodes, hidden) bfloat16, in place: a
        decode step's decoder stack in one call. cos, signed_sin: (num_decodes, head_dim); the rest as
        for `paged_decode_attention`; all contiguous."""
        if self._decode_layers(layers, len(layers), ctypes.byref(shape), x.data_ptr(), x.shape[0],
                               cos.data_ptr(), signed_sin.data_ptr(), slot_mapping.data_ptr(),
                               block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
                               torch.get_num_threads()):
            raise MemoryError("the decode step could not allocate its scratch space")

    def enable_amx(self, wanted: bool) -> bool:
        """Lets the int8 and bfloat16 matmuls of 2 rows and more run on the tile units (AMX), or not;
        returns whether they do: only where the CPU has them and the OS lets this process use them."""
        self.amx = bool(self._enable_amx(int(wanted)))
        return self.amx

    @staticmethod
    def can_attend(head_dim: int, dtype: torch.dtype) -> bool:
        """Whether `paged_decode_attention` takes heads of `head_dim` in `dtype`: bfloat16, head_dim a
        multiple of 32 up to 256."""
        return dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256


# building and loading

@functools.cache
def load() -> CpuKernels | None:
    """The kernels, built on first use; None (logged once, with the reason) where they cannot run."""
    reason = _cannot_build()
    if reason is None:
        try:
            library = ctypes.CDLL(str(_built_library()))
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or error
            reason = f"building {SOURCE.name} failed: {str(detail).strip()[-2000:]}"
        else:
            if library.ms_cpu_supported():
                kernels = CpuKernels(library)
                if kernels.enable_amx(not _switched_off(AMX_VARIABLE)):
                    logger.info("CPU kernels: int8 and bfloat16 matmuls of 2 rows and more on the tile units (AMX)")
                return kernels
            reason = "this CPU lacks AVX-512 with bfloat16 and int8 dot products"
    logger.info("CPU kernels not used (%s); torch's kernels run instead", reason)
    return None


def _cannot_build() -> str | None:
    if _switched_off(DISABLE_VARIABLE):
        return f"{DISABLE_VARIABLE} turns them off"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are written for Linux on x86-64, not {sys.platform} on {platform.machine()}"
    if _compiler() is None:
        return "no C compiler found (set CC, or install gcc)"
    return None


def _switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "")) if os.environ.get("CC") else (shutil.which("gcc")
                                                                               or shutil.which("cc"))


def _built_library() -> Path:
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), compiler, version, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if not target.exists():
        # built beside the target and renamed into place: another process never loads half a file
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                           check=True)
            os.replace(built, target)
        logger.info("built the CPU kernels: %s", target)
    return target


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = base / "mistral-serve" / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    directory = Path(tempfile.gettempdir()) / f"mistral-serve-kernels-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory
