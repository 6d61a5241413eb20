"""The models this server knows: ids, aliases, limits and capabilities; and the ones it serves."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mistral_serve.engine.client import EngineClient

DEMO_MODEL_ID = "smollm2-135m-instruct"  # the demo's served id; its source word is the loader's DEMO_SOURCE


@dataclass(frozen=True)
class ModelCard:
    id: str
    display_name: str
    description: str
    owned_by: str
    context_length: int | None = None  # the most we serve; None: the checkpoint's
    supports_tools: bool = False
    aliases: tuple[str, ...] = ()
    # what a request that leaves them out gets: OpenAI's defaults unless the model's makers advise others
    default_temperature: float = 1.0
    default_top_p: float = 1.0

    @property
    def sampling_defaults(self) -> dict[str, float]:
        return {"temperature": self.default_temperature, "top_p": self.default_top_p}


KNOWN_MODELS: dict[str, ModelCard] = {card.id: card for card in (
    ModelCard("mistralai/Mistral-7B-Instruct-v0.1", "Mistral 7B Instruct v0.1",
              "Mistral's first 7B instruct model (sliding-window attention over 4096 tokens).",
              owned_by="mistralai", context_length=8192),
    ModelCard("mistralai/Mistral-7B-Instruct-v0.2", "Mistral 7B Instruct v0.2",
              "Mistral 7B instruct with a 32k context.", owned_by="mistralai", context_length=32768),
    ModelCard("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3",
              "Mistral 7B instruct with a 32k context, the v3 tokenizer and function calling.",
              owned_by="mistralai", context_length=32768, supports_tools=True, aliases=("open-mistral-7b",)),
    ModelCard(DEMO_MODEL_ID, "SmolLM2 135M Instruct",
              "A small instruct model of the same family, served as a demo when no weights are given.",
              owned_by="HuggingFaceTB", default_temperature=0.2, default_top_p=0.9),  # its model card's advice
)}


def card_for(model_id: str) -> ModelCard:
    """The known card of an id, or a plain card for a model the catalog has no facts about."""
    return KNOWN_MODELS.get(model_id) or ModelCard(model_id, model_id, f"{model_id}, served from a local checkpoint.",
                                                   owned_by="mistral-serve")


def default_model_specs(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """What `serve` serves when no --model is given: the demo model, then every known Mistral model
    found in the local Hugging Face cache (`cache_dir`, default: the usual one), each as (id, source).
    The lookup is offline: nothing is downloaded."""
    from mistral_serve.model.checkpoints.loader import DEMO_SOURCE, CheckpointError, resolve_checkpoint

    specs = [(DEMO_MODEL_ID, DEMO_SOURCE)]
    for model_id in KNOWN_MODELS:
        if model_id == DEMO_MODEL_ID:
            continue
        try:
            path = resolve_checkpoint(model_id, cache_dir=cache_dir)
        except CheckpointError:  # not in the cache
            continue
        specs.append((model_id, str(path)))
    return specs


def parse_model_spec(spec: str) -> tuple[str, str]:
    """`ID=PATH` (PATH: a checkpoint directory, a GGUF file, a Hugging Face id or "demo") → (id, path)."""
    model_id, sep, source = spec.partition("=")
    if not sep or not model_id.strip() or not source.strip():
        raise ValueError(f"--model expects ID=PATH, got {spec!r}")
    return model_id.strip(), source.strip()


@dataclass(frozen=True)
class ServedModel:
    card: ModelCard
    client: EngineClient
    created: int
    quantization: str | None = None

    @property
    def id(self) -> str:
        return self.card.id


class Catalog:
    """The served models, found by id or alias."""

    def __init__(self, served: Iterable[ServedModel]):
        self._served = {model.id: model for model in served}
        self._by_name = dict(self._served)
        for model in self._served.values():
            for alias in model.card.aliases:
                self._by_name.setdefault(alias, model)

    @classmethod
    def from_clients(cls, clients: Mapping[str, EngineClient], quantization: str | None = None) -> Catalog:
        created = int(time.time())
        return cls(ServedModel(card_for(model_id), client, created, quantization)
                   for model_id, client in clients.items())

    def get(self, name: str) -> ServedModel | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        """Every id a request may name: served ids, then their aliases."""
        return list(self._by_name)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._served.values())
