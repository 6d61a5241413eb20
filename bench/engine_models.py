"""The model settings the engine benchmark runs.

`demo` is the demo checkpoint as the loader serves it. `7b-*` are random-weight models of
Mistral-7B-v0.3's exact shape, built straight in memory: on the meta device first, then one
module at a time materialised and filled, so no second copy of the weights ever exists. `7b-int8`
quantizes a block of random rows once and fills every linear layer with them, so it peaks near
its int8 size. `tiny` is a random model of a few megabytes, to check the benchmark in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
import random

import torch
from torch import nn

from mistral_serve.model.config import ModelConfig
from mistral_serve.model.checkpoints.loader import find_demo_gguf, load_model
from mistral_serve.model.mistral import RMSNorm, Transformer
from mistral_serve.model.quant import (Int8Linear, W8A8Linear, quantize_int8, swap_linears_for_int8,
                                      swap_linears_for_w8a8)
from mistral_serve.tokenizer import ChatTokenizer, load_tokenizer

MISTRAL_7B_V03 = ModelConfig(
    vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768)

TINY = ModelConfig(
    vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
    num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096)


@dataclass(frozen=True)
class ModelSetting:
    name: str
    description: str
    default_output_tokens: int  # per stream, when the command line gives none
    load: Callable[[], tuple[Transformer, ChatTokenizer]]


class NumberTokenizer(ChatTokenizer):
    """What the engine needs of a tokenizer, for random-weight models: no EOS, and token i reads "<i>"."""

    supports_tools = False

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_token_id = None
        self.eos_token_ids = frozenset()

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        raise NotImplementedError("random-weight models take token ids, not chat messages")

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("random-weight models take token ids, not text")

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{token_id}>" for token_id in token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return f"<{token_id}>".encode()

    def is_special(self, token_id: int) -> bool:
        return False


# weights

class RandomSource:
    """Cheap random weights: runs, from random offsets, of one block of N(0, std²) values.

    Filling 7 billion weights this way is a memory copy (seconds), where `normal_` per tensor
    takes minutes on a small CPU. The block's length is no multiple of any row length, so rows
    differ. For int8 weights the block is cut into rows of the layer's width and quantized once
    (by quant.py, as the loader does), and weights are filled with runs of those rows.
    """

    def __init__(self, dtype: torch.dtype, seed: int = 0, std: float = 0.02, size: int = (1 << 24) - 3):
        generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.values = (torch.randn(size, generator=generator) * std).to(dtype)
        self.rng = random.Random(seed)
        self._int8_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by row width

    @torch.no_grad()
    def fill_(self, module: nn.Module) -> None:
        """Give the module's own weights (not its children's) random values; a norm gets ones."""
        for param in module.parameters(recurse=False):
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            else:
                self._copy_runs([param.view(-1)], [self.values])

    def fill_int8_(self, module: Int8Linear | W8A8Linear) -> None:
        """Materialise an int8 linear layer's weight and scales (in the dtype the layer keeps them in)
        with quantized random rows."""
        rows = self._int8_rows.get(module.in_features)
        if rows is None:
            num_rows = self.values.numel() // module.in_features
            block = self.values[:num_rows * module.in_features].view(num_rows, module.in_features)
            rows = self._int8_rows[module.in_features] = quantize_int8(block, scales_dtype=self.dtype)
        module.weight = torch.empty(module.out_features, module.in_features, dtype=torch.int8)
        module.scales = torch.empty(module.out_features, dtype=module.scales.dtype)
        self._copy_runs([module.weight, module.scales], rows)

    def _copy_runs(self, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Fill the targets along their first dimension with runs of the sources', each run from a
        random offset, the same one in every source."""
        size, length = len(sources[0]), len(targets[0])
        done = 0
        while done < length:
            start = self.rng.randrange(size)
            count = min(size - start, length - done)
            for target, source in zip(targets, sources):
                target[done:done + count].copy_(source[start:start + count])
            done += count


@torch.no_grad()
def build_random_model(config: ModelConfig, dtype: torch.dtype, quantize: str | None = None,
                       seed: int = 0) -> Transformer:
    """A random-weight model on the CPU, laid out as `load_model` lays out a checkpoint.

    With quantize="int8" the same linear layers are int8 as there (an untied lm_head included),
    with scales in `dtype`; no layer's weight ever exists in `dtype`.
    """
    if quantize not in (None, "int8", "w8a8"):
        raise ValueError(f"quantize must be 'int8', 'w8a8' or None, got {quantize!r}")
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    exclude = {"lm_head"} if config.tie_word_embeddings else ()
    if quantize == "int8":
        swap_linears_for_int8(model, dtype=dtype, exclude=exclude)
    elif quantize == "w8a8":
        swap_linears_for_w8a8(model, exclude=exclude)
    source = RandomSource(dtype, seed)
    for module in model.modules():
        if isinstance(module, (Int8Linear, W8A8Linear)):
            source.fill_int8_(module)
        elif module is not model.rotary:
            module.to_empty(device="cpu", recurse=False)
            source.fill_(module)
    model.rotary.build(torch.device("cpu"))
    model.tie_weights()
    return model.requires_grad_(False).eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights (quantized ones with their scales), each shared tensor once."""
    return sum(tensor.nbytes for tensor in _weights(model).values())


def bytes_read_per_step(model: Transformer) -> int:
    """Bytes of weights one forward pass reads in full: all but the embedding table, of which it
    gathers only a row per token (unless the table is the LM head too)."""
    elsewhere = {t.data_ptr() for name, t in _named_tensors(model) if not name.startswith("embed_tokens.")}
    gathered = _weights(model.embed_tokens).keys() - elsewhere
    return sum(t.nbytes for ptr, t in _weights(model).items() if ptr not in gathered)


def _weights(module: nn.Module) -> dict[int, torch.Tensor]:
    return {t.data_ptr(): t for _, t in _named_tensors(module)}


def _named_tensors(module: nn.Module):
    """Parameters and buffers, without the rotary tables (derived, and only indexed per token)."""
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        if not name.startswith("rotary.") and tensor.numel():
            yield name, tensor


# the settings

def _load_demo(dtype: torch.dtype, quantize: str | None = None) -> tuple[Transformer, ChatTokenizer]:
    path = find_demo_gguf()
    return load_model(path, dtype=dtype, device="cpu", quantize=quantize), load_tokenizer(path)


def _random(config: ModelConfig, dtype: torch.dtype, quantize: str | None = None):
    return lambda: (build_random_model(config, dtype, quantize), NumberTokenizer(config.vocab_size))


SETTINGS = {setting.name: setting for setting in [
    ModelSetting("demo", "demo checkpoint (SmolLM2-135M-Instruct GGUF), float32", 128,
                 lambda: _load_demo(torch.float32)),
    ModelSetting("demo-bf16", "demo checkpoint (SmolLM2-135M-Instruct GGUF), bfloat16", 128,
                 lambda: _load_demo(torch.bfloat16)),
    ModelSetting("demo-int4", "demo checkpoint (SmolLM2-135M-Instruct GGUF), int4 weight-only, bfloat16", 128,
                 lambda: _load_demo(torch.bfloat16, "int4")),
    ModelSetting("7b-bf16", "Mistral-7B-v0.3 shape, random weights, bfloat16", 8,
                 _random(MISTRAL_7B_V03, torch.bfloat16)),
    ModelSetting("7b-int8",
                 "Mistral-7B-v0.3 shape, random weights, int8 weights (inputs as two int8 passes, ~16 bits)", 8,
                 _random(MISTRAL_7B_V03, torch.bfloat16, "int8")),
    ModelSetting("7b-w8a8", "Mistral-7B-v0.3 shape, random weights, int8 weights and int8 activations", 8,
                 _random(MISTRAL_7B_V03, torch.bfloat16, "w8a8")),
    ModelSetting("tiny", "a few-MB random model, float32 (checks the benchmark itself)", 16,
                 _random(TINY, torch.float32)),
    ModelSetting("tiny-int8", "a few-MB random model, int8 weights, float32 activations", 16,
                 _random(TINY, torch.float32, "int8")),
]}
