"""GGUF checkpoints (llama.cpp's format): the config from the metadata, the tensors dequantized.

The file is memory-mapped; each tensor is dequantized only when the loader asks for it, so at
most one dequantized tensor is alive beside the model. Dequantization is `gguf.quants.dequantize`,
llama.cpp's own reference in numpy, which covers the float types, the legacy quants (Q8_0, Q4_0,
Q4_1, ...) and the K-quants.
"""

from __future__ import annotations

from functools import cache, partial
from pathlib import Path
import re
from typing import Any

import gguf
from gguf.quants import dequantize
import numpy as np
import torch

from mistral_serve.model.checkpoints.files import (CheckpointError, CheckpointTensor, num_rotary_heads,
                                              reordered_for_rotary)
from mistral_serve.model.config import ModelConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "mistral")  # llama.cpp writes Mistral 7B as "llama"

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == GGUF_MAGIC


def our_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; unknown names are kept as they are,
    so the loader reports them as unexpected."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"layers.{match[1]}.{_LAYER_NAMES[match[2]]}.weight"
    return gguf_name


class GGUFCheckpoint:
    def __init__(self, path: Path):
        self.path = path
        if not is_gguf_file(path):
            raise CheckpointError(f"{path}: is not a GGUF file (it does not start with the GGUF magic); "
                                  "a checkpoint is a directory with config.json or params.json, or a .gguf file")
        try:
            # copy-on-write mapping: tensors are views of the file, writable without touching it
            self._reader = gguf.GGUFReader(path, "c")
        except Exception as error:  # the reader raises bare ValueError/IndexError on corrupt files
            raise CheckpointError(f"{path}: is not a readable GGUF file ({error})") from error
        self.architecture = self._string("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{path}: GGUF architecture {self.architecture!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if self._value("split.count", 1) > 1:
            raise CheckpointError(f"{path}: is one part of a split GGUF; merge the parts into one file first")
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}

    # metadata

    def _field(self, key: str) -> Any:
        return self._reader.fields.get(key.format(arch=self.architecture))

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._field(key)
        if field is None:
            return default
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            raise CheckpointError(f"{self.path}: metadata {key.format(arch=self.architecture)!r} "
                                  "is an array, expected a single value")
        value = field.parts[field.data[0]][0]
        if field.types[0] == gguf.GGUFValueType.FLOAT32:
            # the shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06
            return float(str(value))
        return value.item()

    def _string(self, key: str) -> str:
        field = self._reader.fields.get(key)
        if field is None or field.types[0] != gguf.GGUFValueType.STRING:
            raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r} string")
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    def _required(self, key: str) -> Any:
        value = self._value(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {key.format(arch=self.architecture)!r}")
        return value

    def _vocab_size(self) -> int:
        vocab_size = self._value(gguf.Keys.LLM.VOCAB_SIZE)
        if vocab_size is not None:
            return int(vocab_size)
        tokens = self._field(gguf.Keys.Tokenizer.LIST)
        if tokens is not None:
            return len(tokens.data)
        embedding = self._tensors.get("token_embd.weight")
        if embedding is None:
            raise CheckpointError(f"{self.path}: cannot tell the vocabulary size (no vocab_size, "
                                  "token list or token_embd.weight)")
        return int(embedding.shape[-1])  # GGUF shapes are in ne order: (hidden, vocab)

    def config(self) -> ModelConfig:
        keys = gguf.Keys
        rope_scaling = self._value(keys.Rope.SCALING_TYPE, "none")
        if rope_scaling != "none" or "rope_freqs.weight" in self._tensors:
            raise CheckpointError(f"{self.path}: rope scaling ({rope_scaling if rope_scaling != 'none' else 'rope_freqs'})"
                                  " is not supported")
        hidden_size = int(self._required(keys.LLM.EMBEDDING_LENGTH))
        num_heads = int(self._required(keys.Attention.HEAD_COUNT))
        head_dim = self._value(keys.Attention.KEY_LENGTH) or self._value(keys.Rope.DIMENSION_COUNT)
        sliding_window = self._value(keys.Attention.SLIDING_WINDOW)
        try:
            return ModelConfig(
                vocab_size=self._vocab_size(),
                hidden_size=hidden_size,
                intermediate_size=int(self._required(keys.LLM.FEED_FORWARD_LENGTH)),
                num_layers=int(self._required(keys.LLM.BLOCK_COUNT)),
                num_heads=num_heads,
                num_kv_heads=int(self._value(keys.Attention.HEAD_COUNT_KV) or num_heads),
                head_dim=int(head_dim or hidden_size // num_heads),
                rms_norm_eps=float(self._value(keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
                rope_theta=float(self._value(keys.Rope.FREQ_BASE, 10000.0)),
                max_position_embeddings=int(self._required(keys.LLM.CONTEXT_LENGTH)),
                sliding_window=int(sliding_window) if sliding_window else None,
                tie_word_embeddings="output.weight" not in self._tensors,
                architecture=self.architecture,
            )
        except CheckpointError:
            raise
        except ValueError as error:
            raise CheckpointError(f"{self.path}: {error}") from error

    # tensors

    def tensors(self, config: ModelConfig) -> list[CheckpointTensor]:
        entries = []
        for gguf_name, reader_tensor in self._tensors.items():
            name = our_tensor_name(gguf_name)
            shape = tuple(int(n) for n in reversed(reader_tensor.shape))  # ne order -> (out, in)
            source = f"{self.path}: tensor {gguf_name!r} ({reader_tensor.tensor_type.name})"
            if not _can_dequantize(reader_tensor.tensor_type):
                raise CheckpointError(f"{source}: tensor type {reader_tensor.tensor_type.name} is not supported")
            load = partial(_dequantize, reader_tensor, shape)
            num_heads = num_rotary_heads(name, config)
            if num_heads:  # llama.cpp stores q/k rows in the interleaved rotary layout
                load = reordered_for_rotary(load, num_heads)
            entries.append(CheckpointTensor(name, shape, source, load))
        return entries


def _dequantize(reader_tensor: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 (a view of the mapped file for F32 tensors), in (out_features, in_features) order."""
    array = dequantize(reader_tensor.data, reader_tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(array).reshape(shape))


# the numpy dtype GGUFReader gives non-quantized tensors; quantized ones come as raw bytes
_STORAGE_DTYPES = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


@cache
def _can_dequantize(tensor_type: gguf.GGMLQuantizationType) -> bool:
    """Whether this gguf version can dequantize the type: try it on one zero block."""
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        dequantize(np.zeros(type_size, dtype=np.uint8).view(_STORAGE_DTYPES.get(tensor_type, np.uint8)),
                   tensor_type)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True
