"""What several model, engine and API tests share: a small Mistral config, our model beside the
transformers reference on the same random weights, and one prompt's logits from a single prefill."""

import pytest
import torch

from mistral_serve.model.attention import AttentionMetadata, PrefillChunk
from mistral_serve.model.checkpoints.loader import load_model
from mistral_serve.model.cpu import kernels as cpu_kernels
from mistral_serve.model.config import ModelConfig
from mistral_serve.model.mistral import Transformer
from tests.checkpoints import (hf_state_dict, random_hf_model, tiny_mistral_config, write_gguf_checkpoint,
                               write_hf_checkpoint, write_native_checkpoint)


def mistral_config(**overrides):
    """Grouped-query attention and a sliding window (8) much shorter than the sequences (~30)."""
    return tiny_mistral_config(sliding_window=8, **overrides)


def reference_and_ours(hf_config, tmp_path=None, checkpoint_format="hf"):
    """The transformers model and ours on the same random weights. With tmp_path, ours is loaded
    from a checkpoint written to disk in the given format; otherwise the weights are copied over."""
    hf_config._attn_implementation = "eager"
    if tmp_path is None:
        reference = random_hf_model(hf_config).eval()
        ours = Transformer(ModelConfig.from_hf_config(hf_config.to_dict()))
        state = hf_state_dict(reference)
        if ours.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        ours.load_state_dict(state, strict=True)
        ours.tie_weights()
        ours.rotary.build(torch.device("cpu"))
        return reference, ours.eval()
    path, reference = write_hf_checkpoint(tmp_path, hf_config)
    if checkpoint_format == "native":
        path = write_native_checkpoint(tmp_path / "native", reference)
    elif checkpoint_format == "gguf":
        architecture = "llama" if hf_config.model_type == "llama" else "mistral"
        (tmp_path / "gguf").mkdir()
        path = write_gguf_checkpoint(tmp_path / "gguf", reference, architecture=architecture)
    return reference.eval(), load_model(path)


def prefill_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position of one prompt, run as a single prefill chunk."""
    config, num_tokens, block_size = model.config, len(token_ids), 16
    num_blocks = -(-num_tokens // block_size)
    dtype = model.embed_tokens.weight.dtype
    kv_caches = [(torch.zeros(num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype),
                  torch.zeros(num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype))
                 for _ in range(config.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens), num_decodes=0, decode_block_tables=None,
                             decode_context_lens=None,
                             prefills=(PrefillChunk(0, num_tokens, 0, torch.arange(num_blocks)),),
                             sliding_window=config.sliding_window)
    positions = torch.arange(num_tokens)
    with torch.inference_mode():
        return model(token_ids, positions, kv_caches, meta, positions)  # (num_tokens, vocab)


needs_kernels = pytest.mark.skipif(cpu_kernels.load() is None,
                                   reason=f"the CPU kernels cannot run here: {cpu_kernels.backend().reason}")


def head_dim_32_config(**overrides):
    """The tiny model with heads of 32, the smallest the fused CPU layers take."""
    return tiny_mistral_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32,
                               **overrides)
