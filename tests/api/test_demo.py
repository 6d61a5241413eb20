"""The API on the demo model (SmolLM2-135M-Instruct): a real instruct model answers, counts are exact."""

import pytest
from fastapi.testclient import TestClient

from mistral_serve.api.app import create_app
from mistral_serve.catalog import DEMO_MODEL_ID
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.builder import load_engine
from mistral_serve.engine.engine import EngineConfig
from mistral_serve.settings import Settings
from tests.api.conftest import bearer, sse_events

pytestmark = pytest.mark.demo
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo_engine(demo_path):
    return load_engine(str(demo_path), config=EngineConfig(kv_cache_memory=64 << 20, max_num_batched_tokens=256))


@pytest.fixture(scope="module")
def demo_client(demo_engine, api_db, tmp_path_factory, api_key):
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {DEMO_MODEL_ID: AsyncEngine(demo_engine)}, api_db)
    with TestClient(app, headers=bearer(api_key)) as client:
        yield client


def test_the_demo_model_answers_with_exact_usage(demo_client, demo_engine, openai_schema):
    body = demo_client.post("/v1/chat/completions", json={
        "model": DEMO_MODEL_ID, "messages": QUESTION, "temperature": 0, "max_tokens": 30}).json()
    openai_schema("CreateChatCompletionResponse", body)
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] == len(demo_engine.tokenizer.encode_chat(QUESTION))
    assert 0 < body["usage"]["completion_tokens"] <= 30


def test_the_demo_stream_matches_the_reply(demo_client, demo_engine):
    request = {"model": DEMO_MODEL_ID, "messages": QUESTION, "temperature": 0, "max_tokens": 12}
    whole = demo_client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    *chunks, done = sse_events(demo_client.post("/v1/chat/completions", json={**request, "stream": True}).text)
    assert done == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    model = demo_client.get(f"/v1/models/{DEMO_MODEL_ID}").json()
    assert model["context_length"] == demo_engine.max_model_len
