"""The catalog: known ids, aliases, and --model specs."""

import pytest

from mistral_serve.catalog import KNOWN_MODELS, Catalog, ServedModel, card_for, parse_model_spec


def test_known_mistral_models_have_their_context_and_only_v03_has_tools():
    contexts = {model_id.rsplit("-", 1)[-1]: card.context_length for model_id, card in KNOWN_MODELS.items()
                if model_id.startswith("mistralai/")}
    assert contexts == {"v0.1": 8192, "v0.2": 32768, "v0.3": 32768}
    assert [c.id for c in KNOWN_MODELS.values() if c.supports_tools] == ["mistralai/Mistral-7B-Instruct-v0.3"]


def test_the_alias_finds_v03_only_when_v03_is_served():
    v03 = ServedModel(card_for("mistralai/Mistral-7B-Instruct-v0.3"), engine=None, created=0)
    v01 = ServedModel(card_for("mistralai/Mistral-7B-Instruct-v0.1"), engine=None, created=0)
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
