"""The catalog: known ids, aliases, and --model specs."""

import pytest

from mistral_serve.catalog import (
    DEMO_MODEL_ID, KNOWN_MODELS, Catalog, ServedModel, card_for, default_model_specs, parse_model_spec,
)
from mistral_serve.model.checkpoints.loader import DEMO_SOURCE


def test_known_mistral_models_have_their_context_and_only_v03_has_tools():
    contexts = {model_id.rsplit("-", 1)[-1]: card.context_length for model_id, card in KNOWN_MODELS.items()
                if model_id.startswith("mistralai/")}
    assert contexts == {"v0.1": 8192, "v0.2": 32768, "v0.3": 32768}
    assert [c.id for c in KNOWN_MODELS.values() if c.supports_tools] == ["mistralai/Mistral-7B-Instruct-v0.3"]


def test_the_alias_finds_v03_only_when_v03_is_served():
    v03 = ServedModel(card_for("mistralai/Mistral-7B-Instruct-v0.3"), client=None, created=0)
    v01 = ServedModel(card_for("mistralai/Mistral-7B-Instruct-v0.1"), client=None, created=0)
    assert Catalog([v03]).get("open-mistral-7b") is v03
    assert Catalog([v01]).get("open-mistral-7b") is None
    assert card_for("my-model").display_name == "my-model"


def test_model_specs_are_id_equals_path():
    assert parse_model_spec("mistralai/Mistral-7B-Instruct-v0.3=/models/v3") == (
        "mistralai/Mistral-7B-Instruct-v0.3", "/models/v3")
    assert parse_model_spec("demo-model=demo") == ("demo-model", "demo")
    for bad in ("/models/v3", "=x", "id="):
        with pytest.raises(ValueError, match="ID=PATH"):
            parse_model_spec(bad)


def test_with_no_model_given_the_demo_and_every_cached_mistral_are_served(tmp_path):
    """A Hugging Face cache (the layout huggingface_hub documents) holding v0.1 and v0.3, and a
    model the catalog does not know: the demo comes first, then the known ones found, in order."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo_id in ("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.1", "someone/other"):
        repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    assert default_model_specs(cache_dir=tmp_path) == [
        (DEMO_MODEL_ID, DEMO_SOURCE),
        ("mistralai/Mistral-7B-Instruct-v0.1",
         str(tmp_path / "models--mistralai--Mistral-7B-Instruct-v0.1" / "snapshots" / commit)),
        ("mistralai/Mistral-7B-Instruct-v0.3",
         str(tmp_path / "models--mistralai--Mistral-7B-Instruct-v0.3" / "snapshots" / commit)),
    ]
    assert default_model_specs(cache_dir=tmp_path / "empty") == [(DEMO_MODEL_ID, DEMO_SOURCE)]


def test_the_demo_card_advises_its_own_sampling_and_the_mistral_cards_openais():
    assert card_for(DEMO_MODEL_ID).sampling_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert card_for("mistralai/Mistral-7B-Instruct-v0.3").sampling_defaults == {"temperature": 1.0, "top_p": 1.0}
