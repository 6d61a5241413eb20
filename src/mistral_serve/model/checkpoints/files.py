"""Low-level reading of checkpoint files, shared by every format.

Holds the one error type the loader raises, the description of a tensor that can be checked before
it is read (`CheckpointTensor`), a memory-mapped safetensors reader, and the rotary layout
conversion that Mistral's native format and GGUF both need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import json
import os
from pathlib import Path
import struct
from typing import Any

import numpy as np
import torch

from mistral_serve.model.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class CheckpointTensor:
    """A tensor of a checkpoint, named in our layout, whose shape is known before its data is read."""

    name: str  # our name, e.g. "layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # (out_features, in_features) for weights, whatever the file's order
    source: str  # file and name in the file, for error messages
    load: Callable[[], torch.Tensor]  # the tensor in our layout; memory-mapped where possible


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def interleaved_to_half_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from the interleaved rotary layout (Meta, Mistral native, GGUF)
    to Hugging Face's rotate-half layout, as transformers' converters do.

    Interleaved pairs a head's dimensions as (0, 1), (2, 3), ...; rotate-half pairs them as
    (0, d/2), (1, d/2 + 1), ...  weight: (num_heads * head_dim, in_features).
    """
    rows = weight.shape[0]
    pairs = rows // num_heads // 2
    # (num_heads, pairs, 2, in) -> (num_heads, 2, pairs, in): evens first, then odds
    return weight.reshape(num_heads, pairs, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def reordered_for_rotary(load: Callable[[], torch.Tensor], num_heads: int) -> Callable[[], torch.Tensor]:
    """`load`, followed by the interleaved -> rotate-half reordering of its rows."""
    return lambda: interleaved_to_half_rotary(load(), num_heads)


def num_rotary_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads' worth of rotary rows the tensor `name` holds: q and k projections only."""
    if name.endswith("self_attn.q_proj.weight"):
        return config.num_heads
    if name.endswith("self_attn.k_proj.weight"):
        return config.num_kv_heads
    return None


_SAFETENSORS_DTYPES = {
    # safetensors dtype -> (numpy dtype of the same width, torch dtype to view it as)
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: read the bits, view them in torch
    "F64": (np.float64, torch.float64),
}


class SafetensorsFile:
    """A .safetensors file, memory-mapped copy-on-write: tensors are views of the file's pages,
    so nothing is read or copied until it is used.

    The format: an 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and byte range, then the data.
    """

    def __init__(self, path: Path):
        self.path = path
        self._header, data_start = self._read_header(path)
        self._data = np.memmap(path, dtype=np.uint8, mode="c")
        self._data_start = data_start
        num_data_bytes = len(self._data) - data_start
        for name, info in self._header.items():
            self._check_entry(name, info, num_data_bytes)

    @staticmethod
    def _read_header(path: Path) -> tuple[dict[str, Any], int]:
        try:
            with open(path, "rb") as file:
                prefix = file.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{path}: is empty or truncated (no safetensors header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > os.fstat(file.fileno()).st_size - 8:
                    raise CheckpointError(f"{path}: is truncated or not a safetensors file "
                                          f"(header of {header_len} bytes is longer than the file)")
                header_bytes = file.read(header_len)
        except OSError as error:
            raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from error
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: has a corrupt safetensors header ({error})") from error
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: has a corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        return header, 8 + header_len

    def _check_entry(self, name: str, info: Any, num_data_bytes: int) -> None:
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{self.path}: corrupt safetensors entry for {name!r}") from error
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}; only "
                                  f"{', '.join(_SAFETENSORS_DTYPES)} are supported")
        if end > num_data_bytes:
            raise CheckpointError(f"{self.path}: is truncated: tensor {name!r} ends at byte {end} of the data, "
                                  f"but the file holds only {num_data_bytes} data bytes")
        itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype][0]).itemsize
        if begin < 0 or end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r}: byte range does not match "
                                  f"shape {shape} and dtype {dtype}")

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._header[name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapped file (a copy only if the data is misaligned)."""
        info = self._header[name]
        np_dtype, torch_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = (self._data_start + offset for offset in info["data_offsets"])
        raw = self._data[begin:end]
        if begin % np.dtype(np_dtype).itemsize:
            raw = raw.copy()  # torch needs aligned elements; writers align them, but the format does not promise it
        array = raw.view(np_dtype).reshape(self.shape(name))
        return torch.from_numpy(array).view(torch_dtype)
