"""GET /metrics: Prometheus text with engine state, latencies and token counts per model."""

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, NO_EOS, bearer, chat


@pytest.fixture()
def metrics_client(make_engine, api_db, tmp_path_factory, api_key):
    """An app of its own, so the counters start at zero."""
    engine = make_engine()
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(engine)}, api_db),
                    headers=bearer(api_key)) as client:
        yield client, engine


def scrape(client) -> dict:
    response = client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted({"model": MODEL_ID, **labels}.items())))]


def test_metrics_count_the_tokens_of_each_request_and_show_the_engine_state(metrics_client):
    client, engine = metrics_client
    before = scrape(client)
    assert value(before, "mistral_serve_kv_blocks_total") == engine.num_kv_blocks_total
    assert value(before, "mistral_serve_requests_running") == 0
    usages = [client.post("/v1/chat/completions", json=chat(max_tokens=6, logit_bias=NO_EOS)).json()["usage"]
              for _ in range(2)]
    stream = client.post("/api/ai/chat/completions", json=chat(max_tokens=4, logit_bias=NO_EOS, stream=True))
    assert stream.status_code == 200
    after = scrape(client)
    assert value(after, "mistral_serve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages) + \
        usages[0]["prompt_tokens"]
    assert value(after, "mistral_serve_generation_tokens_total") == 6 + 6 + 4
    assert value(after, "mistral_serve_time_to_first_token_seconds_count") == 3
    # each request's tokens after the first are timed
    assert value(after, "mistral_serve_inter_token_latency_seconds_count") == 5 + 5 + 3
    assert value(after, "mistral_serve_requests_total", outcome="finished") == 3
    assert value(after, "mistral_serve_kv_blocks_used") == 0
    assert value(after, "mistral_serve_requests_waiting") == 0


def test_metrics_answer_without_a_key(metrics_client):
    client, _ = metrics_client
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200
