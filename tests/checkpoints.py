"""Small random checkpoints on disk, in every format the loader reads, for tests.

All writers start from one transformers model, so a test can load any format with our loader
and compare with that model: its weights (`hf_state_dict`) or its logits.

    hf_config = tiny_mistral_config(sliding_window=8)
    path, hf_model = write_hf_checkpoint(tmp_path, hf_config)
    native_path = write_native_checkpoint(tmp_path, hf_model)
    gguf_path = write_gguf_checkpoint(tmp_path, hf_model)                 # F32: exact weights
    q8_path = write_gguf_checkpoint(tmp_path, hf_model, tensor_type=Q8_0)  # lossy

The writers follow the converters that produce real checkpoints: transformers'
`convert_mistral_weights_to_hf.py` (read backwards) for the native layout and llama.cpp's
`convert_hf_to_gguf.py` for GGUF, each independently of the loader's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType
import numpy as np
from safetensors.torch import save_file
import torch
import transformers

F32 = GGMLQuantizationType.F32
F16 = GGMLQuantizationType.F16
BF16 = GGMLQuantizationType.BF16
Q8_0 = GGMLQuantizationType.Q8_0
Q4_0 = GGMLQuantizationType.Q4_0
Q4_1 = GGMLQuantizationType.Q4_1

# Weights with this spread give logits with a spread of a few units, so a comparison of logits
# means something (transformers' default of 0.02 gives nearly uniform logits).
INITIALIZER_RANGE = 0.2


def tiny_mistral_config(**overrides) -> transformers.MistralConfig:
    """2 layers, hidden 64, 4 heads of 16, 2 KV heads, vocab 512; no sliding window unless asked."""
    values = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                  initializer_range=INITIALIZER_RANGE)
    values.update(overrides)
    return transformers.MistralConfig(**values)


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    """Like tiny_mistral_config, with llama's defaults: rope theta 10000, tied embeddings."""
    values = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  initializer_range=INITIALIZER_RANGE)
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def random_hf_model(hf_config, *, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 MistralForCausalLM / LlamaForCausalLM with random weights, norms included
    (transformers initialises norms to ones, which would hide a norm that is not loaded)."""
    model_class = transformers.LlamaForCausalLM if hf_config.model_type == "llama" else transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = model_class(hf_config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def hf_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The model's weights under our names (no `model.` prefix, no lm_head when tied)."""
    state = {name.removeprefix("model."): tensor for name, tensor in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_hf_checkpoint(tmp_path: Path, hf_config, *, seed: int = 0, sharded: bool = False
                        ) -> tuple[Path, transformers.PreTrainedModel]:
    """`tmp_path/hf`: config.json + model.safetensors, or several shards and an index."""
    model = random_hf_model(hf_config, seed=seed)
    path = Path(tmp_path) / ("hf-sharded" if sharded else "hf")
    # transformers 5 always writes safetensors; a small max_shard_size forces several shards
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
    return path, model


# Mistral native: params.json + consolidated.safetensors

_NATIVE_NAMES = {
    "embed_tokens": "tok_embeddings", "norm": "norm", "lm_head": "output",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
}


def half_to_interleaved_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> the interleaved order of Meta, Mistral native and llama.cpp
    (convert_hf_to_gguf's `permute`).  weight: (num_heads * head_dim, in_features)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _renamed(name: str, names: dict[str, str], layer_prefix: str) -> str:
    """Our `layers.{i}.<module>.weight` (or a top-level weight) in another format's naming."""
    module = name.removesuffix(".weight")
    if module.startswith("layers."):
        _, index, layer_module = module.split(".", 2)
        return f"{layer_prefix}.{index}.{names[layer_module]}.weight"
    return f"{names[module]}.weight"


def _native_name(name: str) -> str:
    return _renamed(name, _NATIVE_NAMES, "layers")


def write_native_checkpoint(tmp_path: Path, hf_model) -> Path:
    """`tmp_path/native`: params.json + consolidated.safetensors of the same weights."""
    config = hf_model.config
    path = Path(tmp_path) / "native"
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in hf_state_dict(hf_model).items():
        if name.endswith("q_proj.weight"):
            tensor = half_to_interleaved_rotary(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = half_to_interleaved_rotary(tensor, config.num_key_value_heads)
        tensors[_native_name(name)] = tensor.contiguous()
    save_file(tensors, path / "consolidated.safetensors")
    params = dict(dim=config.hidden_size, n_layers=config.num_hidden_layers, head_dim=config.head_dim,
                  hidden_dim=config.intermediate_size, n_heads=config.num_attention_heads,
                  n_kv_heads=config.num_key_value_heads, norm_eps=config.rms_norm_eps,
                  vocab_size=config.vocab_size, rope_theta=_rope_theta(config),
                  max_seq_len=config.max_position_embeddings)
    if getattr(config, "sliding_window", None):
        params["sliding_window"] = config.sliding_window
    if config.tie_word_embeddings:
        params["tied_embeddings"] = True
    (path / "params.json").write_text(json.dumps(params, indent=2))
    return path


def _rope_theta(config) -> float:
    rope_theta = getattr(config, "rope_theta", None)
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(rope_theta)


# GGUF (llama.cpp)

_GGUF_NAMES = {
    "embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    return _renamed(name, _GGUF_NAMES, "blk")


def gguf_tensor_data(array: np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    """A float32 (rows, cols) array as GGUFWriter takes it: typed for F32/F16, bytes otherwise."""
    if tensor_type == F32:
        return array.astype(np.float32)
    if tensor_type == F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), tensor_type)


def write_gguf_checkpoint(tmp_path: Path, hf_model, *, tensor_type: GGMLQuantizationType = F32,
                          architecture: str = "llama", name: str | None = None) -> Path:
    """`tmp_path/<name or model-TYPE.gguf>`: the same weights as llama.cpp would convert them.

    2-D weights are stored as `tensor_type` (it must be one `gguf.quants.quantize` can write),
    norms stay F32 as llama.cpp keeps them; a placeholder vocabulary makes the file well-formed.
    """
    config = hf_model.config
    path = Path(tmp_path) / (name or f"model-{tensor_type.name}.gguf")
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("tiny random test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    _add_placeholder_vocabulary(writer, config.vocab_size)

    for our_name, tensor in hf_state_dict(hf_model).items():
        array = tensor.detach().float().numpy()
        if our_name.endswith("q_proj.weight"):
            array = half_to_interleaved_rotary(tensor, config.num_attention_heads).numpy()
        elif our_name.endswith("k_proj.weight"):
            array = half_to_interleaved_rotary(tensor, config.num_key_value_heads).numpy()
        if array.ndim == 1:  # norms
            writer.add_tensor(_gguf_name(our_name), array.astype(np.float32))
            continue
        data = gguf_tensor_data(array, tensor_type)
        writer.add_tensor(_gguf_name(our_name), data, raw_dtype=None if tensor_type in (F32, F16) else tensor_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_placeholder_vocabulary(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<t{i}>" for i in range(len(specials), vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials)
                           + [gguf.TokenType.NORMAL] * (vocab_size - len(specials)))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
