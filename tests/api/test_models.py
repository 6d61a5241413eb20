"""The model catalog over HTTP, and the request schema it publishes agreeing with the server."""

import jsonschema
import pytest

from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, chat
from tests.api.helpers import BAD_REQUESTS

OPENAI_FIELDS = {"id", "object", "created", "owned_by"}
OUR_FIELDS = {"display_name", "description", "context_length", "capabilities", "quantization", "backend", "pool",
              "json_request_schema"}


@pytest.mark.parametrize("prefix", ["/v1", "/api/ai"])
def test_models_are_listed_and_found_by_id_with_a_slash_or_by_alias(client, openai_schema, prefix):
    listing = client.get(f"{prefix}/models").json()
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == [MODEL_ID, "open-mistral-7b"]
    for name in (MODEL_ID, "open-mistral-7b"):
        model = client.get(f"{prefix}/models/{name}").json()
        openai_schema("Model", {key: model[key] for key in OPENAI_FIELDS})
        assert set(model) == OPENAI_FIELDS | OUR_FIELDS
        assert model["id"] == name and model["object"] == "model" and model["owned_by"] == "mistralai"
        assert model["context_length"] == CONTEXT_LENGTH  # the tiny checkpoint's, below the card's 32768


def test_the_model_and_ready_say_where_and_on_which_kernels_it_runs(client):
    backend = client.get(f"/v1/models/{MODEL_ID}").json()["backend"]
    assert backend["device"] == "cpu" and backend["dtype"] in ("float32", "bfloat16")
    assert backend["kernels"].startswith(("ours: ", "torch's")) and backend["kernel_path"]
    assert client.get("/ready").json()["backends"] == {MODEL_ID: backend}


def test_the_request_schema_caps_max_tokens_at_the_context(client):
    schema = client.get(f"/v1/models/{MODEL_ID}").json()["json_request_schema"]
    jsonschema.Draft202012Validator.check_schema(schema)
    integer = next(b for b in schema["properties"]["max_tokens"]["anyOf"] if b.get("type") == "integer")
    assert integer["maximum"] == CONTEXT_LENGTH - 1
    assert set(schema["properties"]["model"]["enum"]) == {MODEL_ID, "open-mistral-7b"}


# every JSON body from the malformed table, plus good ones; prompt length (it depends on the tokenizer)
# and what the grammar engine can enforce of a response schema are rules the schema cannot say, so
# those rows are left out
GOOD = [chat(), chat(temperature=0, max_tokens=3, stop="x", seed=1, logprobs=True, top_logprobs=2),
        chat(stream=True, stream_options={"include_usage": True}, max_tokens=2),
        chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Hi"}]}], top_k=5, min_p=0.1, repetition_penalty=1.2, user="u", max_tokens=2),
        chat(model="open-mistral-7b", response_format={"type": "text"}, max_completion_tokens=2, top_p=0)]
SCHEMA_CASES = GOOD + [body for what, body, status, _ in BAD_REQUESTS
                       if isinstance(body, dict) and status == 400
                       and what not in ("prompt beyond the context", "assistant last (template refuses)",
                                        "logit_bias id outside the vocabulary",
                                        "response_format schema the grammar cannot enforce")]


def test_a_body_the_schema_accepts_is_served_and_one_it_refuses_is_refused(client):
    schema = client.get(f"/v1/models/{MODEL_ID}").json()["json_request_schema"]
    validator = jsonschema.Draft202012Validator(schema)
    for body in SCHEMA_CASES:
        accepted = validator.is_valid(body)
        status = client.post("/v1/chat/completions", json={**body, "max_tokens": 2}
                             if accepted and "max_completion_tokens" not in body else body).status_code
        assert (status == 200) == accepted, (body, status)
