"""Our CPU kernels (kernels.c), one checked method each: int4, int8 and bfloat16 matmuls, decode
attention over the paged cache, the small per-layer ops, and a whole decode step.

The functions are bound from kernels.h (header.py), the declaration kernels.c is compiled against;
ctypes lets go of the GIL during a call. Every method checks its tensors' dtype, shape, device and
contiguity before the call and raises TypeError or ValueError: a wrong call must never reach C,
where it would read or write past a tensor instead of failing.

`load()` (library.py) gives the kernels, or None where they cannot run: they are an accelerator,
never a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from mistral_serve.model.cpu.header import read_header
from mistral_serve.model.cpu.layouts import TILE_ROWS
from mistral_serve.model.cpu.library import (AMX_VARIABLE, DISABLE_VARIABLE, KernelBackend, LibraryUnavailable, bind,
                                             is_switched_off, open_library, openmp_of)

logger = logging.getLogger(__name__)

HEADER = read_header(Path(__file__).with_name("kernels.h"))
LinearWeights = HEADER.structs["LinearWeights"]  # an int4 or bfloat16 layer in the kernels' layout
LayerWeights = HEADER.structs["LayerWeights"]  # a decoder layer's norms, projections and KV cache
DecoderShape = HEADER.structs["DecoderShape"]


class CpuKernels:
    """The loaded library: one method per kernel, on CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        """`library`: built from the sources of kernels.h (library.py checks that before this)."""
        self._c = {name: bind(library, function) for name, function in HEADER.functions.items()}
        self.amx = False

    def int4_linear(self, x: torch.Tensor, weight: torch.Tensor, scales_offsets: torch.Tensor, group_size: int,
                    out_features: int) -> torch.Tensor:
        """x: (rows, in) bfloat16; weight and scales_offsets from `int4_layout`. Returns (rows, out_features)
        bfloat16."""
        rows, in_features = _matrix("x", x, (torch.bfloat16,))
        _multiple("out_features", out_features, TILE_ROWS)
        if group_size <= 0 or group_size % 4 or in_features % group_size:
            raise ValueError(f"group_size {group_size} must be a multiple of 4 that divides in_features "
                             f"{in_features}")
        tiles = out_features // TILE_ROWS
        _tensor("weight", weight, (torch.uint8,), (tiles, in_features // 4, 2, 32))
        _tensor("scales_offsets", scales_offsets, (torch.float32,), (tiles, in_features // group_size, 4, 16))
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
        if self._c["ms_int4_linear"](x.data_ptr(), rows, in_features, weight.data_ptr(), scales_offsets.data_ptr(),
                                     out_features, group_size, out.data_ptr(), torch.get_num_threads()):
            raise MemoryError("the int4 kernel could not allocate its scratch space")
        return out

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, weight_sums: torch.Tensor,
                    input_passes: int) -> torch.Tensor:
        """x: (rows, in) bfloat16 or float32; weight from `int8_layout`, scales (out,) float32,
        weight_sums (out,) int32; input_passes 1 or 2. Returns (rows, out) in x's dtype."""
        rows, in_features = _matrix("x", x, (torch.bfloat16, torch.float32))
        out_features = _tensor("scales", scales, (torch.float32,), (None,))[0]
        _multiple("out_features", out_features, TILE_ROWS)
        _multiple("in_features", in_features, 4)
        _tensor("weight", weight, (torch.int8,), (out_features // TILE_ROWS, in_features // 4, 2, 64))
        _tensor("weight_sums", weight_sums, (torch.int32,), (out_features,))
        if input_passes not in (1, 2):
            raise ValueError(f"input_passes must be 1 or 2, not {input_passes!r}")
        out = torch.empty(rows, out_features, dtype=x.dtype)
        if self._c["ms_int8_linear"](x.data_ptr(), rows, in_features, weight.data_ptr(), scales.data_ptr(),
                                     weight_sums.data_ptr(), out_features, input_passes, out.data_ptr(),
                                     x.dtype == torch.float32, torch.get_num_threads()):
            raise MemoryError("the int8 kernel could not allocate its scratch space")
        return out

    def bf16_linear(self, x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
        """x: (rows, in) bfloat16; weight from `bf16_layout`. Returns (rows, out) bfloat16."""
        rows, in_features = _matrix("x", x, (torch.bfloat16,))
        _multiple("out_features", out_features, TILE_ROWS)
        _multiple("in_features", in_features, 4)
        _tensor("weight", weight, (torch.bfloat16,), (out_features // TILE_ROWS, in_features // 2, 2, 32))
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
        if self._c["ms_bf16_linear"](x.data_ptr(), rows, in_features, weight.data_ptr(), out_features,
                                     out.data_ptr(), torch.get_num_threads()):
            raise MemoryError("the bfloat16 kernel could not allocate its scratch space")
        return out

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, sliding_window: int | None,
                               scale: float) -> torch.Tensor:
        """q: (num_decodes, num_heads, head_dim) bfloat16; caches (num_blocks, block_size, num_kv_heads,
        head_dim) bfloat16; block_tables (num_decodes, width) int64; context_lens (num_decodes,) int64.
        Returns (num_decodes, num_heads, head_dim) bfloat16."""
        num_decodes, num_heads, head_dim = _tensor("q", q, (torch.bfloat16,), (None, None, None))
        _check_attention(head_dim, num_heads, k_cache, v_cache)
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        _decode_tables(num_decodes, block_tables, context_lens)
        out = torch.empty_like(q)
        self._c["ms_paged_decode_attention"](
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            context_lens.data_ptr(), sliding_window or 0, num_decodes, num_heads, num_kv_heads, head_dim, block_size,
            scale, out.data_ptr(), torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: (rows, dim) bfloat16, dim % 16 == 0; weight (dim,) bfloat16. As the model's RMSNorm:
        weight * bf16(x * rsqrt(mean(x²) + eps)), in float32 inside."""
        rows, dim = _matrix("x", x, (torch.bfloat16,))
        _multiple("the norm's width", dim, 16)
        _tensor("weight", weight, (torch.bfloat16,), (dim,))
        out = torch.empty_like(x)
        self._c["ms_rms_norm"](x.data_ptr(), rows, dim, weight.data_ptr(), eps, out.data_ptr(),
                               torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: (rows, 2 * inner) bfloat16, inner % 16 == 0. Returns silu(gate) * up."""
        rows, width = _matrix("gate_up", gate_up, (torch.bfloat16,))
        _multiple("gate_up's width", width, 32)
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._c["ms_silu_and_mul"](gate_up.data_ptr(), rows, width // 2, out.data_ptr(), torch.get_num_threads())
        return out

    def rotary_and_cache(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                         signed_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
        """qkv: (rows, num_heads + 2 * num_kv_heads, head_dim) bfloat16: its q and k heads rotated in place
        (cos, signed_sin: (rows, head_dim), as the model's rotary gives them), then each row's k and v
        copied into the caches at slot_mapping[row]."""
        rows, _, head_dim = _tensor("qkv", qkv, (torch.bfloat16,), (None, num_heads + 2 * num_kv_heads, None))
        _check_attention(head_dim, num_heads, k_cache, v_cache, num_kv_heads)
        _rotary("cos", cos, rows, head_dim)
        _rotary("signed_sin", signed_sin, rows, head_dim)
        _tensor("slot_mapping", slot_mapping, (torch.int64,), (rows,))
        self._c["ms_rotary_and_cache"](qkv.data_ptr(), rows, num_heads, num_kv_heads, head_dim, cos.data_ptr(),
                                       signed_sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                       slot_mapping.data_ptr(), torch.get_num_threads())

    def decode_layers(self, layers, shape: DecoderShape, x: torch.Tensor, cos: torch.Tensor,
                      signed_sin: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor) -> None:
        """Every layer of `layers` (a LayerWeights array) on x (num_decodes, hidden) bfloat16, in place: a
        decode step's decoder stack in one call. cos, signed_sin: (num_decodes, head_dim); the rest as
        for `paged_decode_attention`. The layers' weights and caches are checked when they are built
        (layers.py), not on every step."""
        if not isinstance(layers, ctypes.Array) or layers._type_ is not LayerWeights:
            raise TypeError(f"layers must be a ctypes array of LayerWeights, not {type(layers).__name__}")
        if not isinstance(shape, DecoderShape):
            raise TypeError(f"shape must be a DecoderShape, not {type(shape).__name__}")
        num_decodes = _tensor("x", x, (torch.bfloat16,), (None, shape.hidden))[0]
        _rotary("cos", cos, num_decodes, shape.head_dim)
        _rotary("signed_sin", signed_sin, num_decodes, shape.head_dim)
        _tensor("slot_mapping", slot_mapping, (torch.int64,), (num_decodes,))
        _decode_tables(num_decodes, block_tables, context_lens)
        if self._c["ms_decode_layers"](layers, len(layers), ctypes.byref(shape), x.data_ptr(), num_decodes,
                                       cos.data_ptr(), signed_sin.data_ptr(), slot_mapping.data_ptr(),
                                       block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
                                       torch.get_num_threads()):
            raise MemoryError("the decode step could not allocate its scratch space")

    def enable_amx(self, wanted: bool) -> bool:
        """Lets the int8 and bfloat16 matmuls of 2 rows and more run on the tile units (AMX), or not;
        returns whether they do: only where the CPU has them and the OS lets this process use them."""
        self.amx = bool(self._c["ms_enable_amx"](int(wanted)))
        return self.amx

    @staticmethod
    def can_attend(head_dim: int, dtype: torch.dtype) -> bool:
        """Whether `paged_decode_attention` takes heads of `head_dim` in `dtype`: bfloat16, head_dim a
        multiple of 32 up to 256."""
        return dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256


# the checks every call makes (cheap: a few attribute reads per tensor)

def _tensor(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...],
            shape: tuple[int | None, ...]) -> torch.Size:
    """The tensor's shape, once it is a contiguous CPU tensor of one of `dtypes` and of `shape` (None: any
    size in that dimension); TypeError or ValueError otherwise."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, not {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, not {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, not on {tensor.device}")
    if tensor.dim() != len(shape) or any(want is not None and have != want for have, want in zip(tensor.shape, shape)):
        wanted = ", ".join("any" if size is None else str(size) for size in shape)
        raise ValueError(f"{name} must have the shape ({wanted}), not {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return tensor.shape


def _matrix(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Size:
    return _tensor(name, tensor, dtypes, (None, None))


def _multiple(name: str, value: int, of: int) -> None:
    if value <= 0 or value % of:
        raise ValueError(f"{name} must be a positive multiple of {of}, not {value}")


def _rotary(name: str, tensor: torch.Tensor, rows: int, head_dim: int) -> None:
    """(rows, head_dim), or (rows, 1, head_dim) as the model's rotary embedding gives it for broadcasting."""
    _tensor(name, tensor, (torch.bfloat16,), (rows, 1, head_dim) if tensor.dim() == 3 else (rows, head_dim))


def _check_attention(head_dim: int, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     num_kv_heads: int | None = None) -> None:
    if not CpuKernels.can_attend(head_dim, torch.bfloat16):
        raise ValueError(f"the attention kernels take heads of a multiple of 32 up to 256, not {head_dim}")
    cache_shape = _tensor("k_cache", k_cache, (torch.bfloat16,), (None, None, num_kv_heads, head_dim))
    _tensor("v_cache", v_cache, (torch.bfloat16,), tuple(cache_shape))
    if num_heads % cache_shape[2]:
        raise ValueError(f"{num_heads} query heads do not share {cache_shape[2]} KV heads evenly")


def _decode_tables(num_decodes: int, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    _tensor("block_tables", block_tables, (torch.int64,), (num_decodes, None))
    _tensor("context_lens", context_lens, (torch.int64,), (num_decodes,))


# loading

def load() -> CpuKernels | None:
    """The kernels, or None where this process cannot use them: the reason is logged once, at WARNING
    (the README's speed depends on them) unless the operator switched them off."""
    return _loaded()[0]


def backend() -> KernelBackend:
    """Which kernels this process runs (after `load()`, which this calls)."""
    return _loaded()[1]


@functools.cache
def _loaded() -> tuple[CpuKernels | None, KernelBackend]:
    if is_switched_off(DISABLE_VARIABLE):
        reason = f"{DISABLE_VARIABLE} turns them off"
        logger.info("CPU kernels: torch's (%s)", reason)
        return None, KernelBackend(is_available=False, reason=reason)
    try:
        library, origin = open_library(HEADER)
        kernels = CpuKernels(library)
        if not kernels._c["ms_cpu_supported"]():
            raise LibraryUnavailable("this CPU lacks AVX-512 with bfloat16 and int8 dot products (VNNI)")
    except LibraryUnavailable as error:
        logger.warning("CPU kernels: ours are not used, torch's run instead (slower): %s", error)
        return None, KernelBackend(is_available=False, reason=str(error))
    kernels.enable_amx(not is_switched_off(AMX_VARIABLE))
    found = KernelBackend(is_available=True, instruction_set="avx512", has_tiles=kernels.amx,
                          openmp=_openmp_shared_with_torch(library), origin=origin)
    logger.info("CPU kernels: %s", found.describe())
    return kernels, found


def _openmp_shared_with_torch(library: ctypes.CDLL) -> str:
    """"torch's": the kernels run on torch's OpenMP runtime, so called from the thread that runs torch's
    ops they reuse its team of threads; anything else is a WARNING (two pools compete for the cores)."""
    ours = openmp_of(library)
    try:
        torchs = openmp_of(ctypes.CDLL(str(Path(torch.__file__).with_name("lib") / "libtorch_cpu.so")))
    except OSError:  # a torch laid out otherwise: whose runtime it runs on is not known
        torchs = None
    if ours is not None and ours == torchs:
        return f"torch's ({ours.name})"
    logger.warning("CPU kernels: their OpenMP runtime (%s) is not torch's (%s): two thread pools compete for "
                   "the cores", ours, torchs)
    return f"{ours.name if ours else 'none'}, not torch's"


def forget_loaded() -> None:
    """Load afresh on the next call (after a switch in the environment changed: tests)."""
    _loaded.cache_clear()


if __name__ == "__main__":  # `python -m mistral_serve.model.cpu.kernels`: which kernels this machine runs
    load()
    print(f"CPU kernels: {backend().describe()}")
