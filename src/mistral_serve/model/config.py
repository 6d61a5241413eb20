"""The architectural numbers of a Llama/Mistral-family checkpoint, read from the checkpoint itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know; frozen so no one fills it in later."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    architecture: str = "mistral"  # "mistral" or "llama": the same network, different defaults

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads ({self.num_heads}) is not a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"model config: sliding_window must be positive, got {self.sliding_window}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` (MistralForCausalLM or LlamaForCausalLM)."""
        hidden_size = int(config["hidden_size"])
        num_heads = int(config["num_attention_heads"])
        rope_scaling = config.get("rope_scaling") or {}
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"config.json: rope_scaling type {rope_type!r} is not supported")
        rope_theta = config.get("rope_theta")
        if rope_theta is None:  # newer transformers nest it under rope_parameters
            rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        model_type = config.get("model_type", "mistral")
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
            sliding_window=config.get("sliding_window") if model_type == "mistral" else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            architecture="llama" if model_type == "llama" else "mistral",
        )

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """From Mistral's native `params.json`."""
        dim = int(params["dim"])
        num_heads = int(params["n_heads"])
        sliding_window = params.get("sliding_window")
        return cls(
            vocab_size=int(params.get("vocab_size") or vocab_size or 32000),
            hidden_size=dim,
            intermediate_size=int(params["hidden_dim"]),
            num_layers=int(params["n_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(params.get("n_kv_heads") or num_heads),
            head_dim=int(params.get("head_dim") or dim // num_heads),
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            # v0.1's params.json has no context length; it is served at 8k with a 4096 window
            max_position_embeddings=int(params.get("max_seq_len") or params.get("max_position_embeddings")
                                        or (8192 if sliding_window else 32768)),
            sliding_window=int(sliding_window) if sliding_window else None,
            tie_word_embeddings=bool(params.get("tied_embeddings", False)),
            architecture="mistral",
        )
