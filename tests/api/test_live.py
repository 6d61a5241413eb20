"""A real uvicorn on loopback: the official openai client, and a dropped stream freeing its KV blocks."""

import httpx
import openai
import pytest

from tests.api.conftest import MODEL_ID, NO_EOS, bearer, wait_until


@pytest.mark.parametrize("path, model", [("/v1", MODEL_ID), ("/api/ai", "open-mistral-7b")])
def test_the_openai_client_works_plain_and_streaming(live_url, api_key, path, model):
    client = openai.OpenAI(base_url=live_url + path, api_key=api_key, max_retries=0)
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
        logit_bias={0: -100})
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.choices[0].message.tool_calls in ([], None)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
        logit_bias={0: -100}, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    assert [m.id for m in client.models.list()] == [MODEL_ID, "open-mistral-7b"]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], temperature=5)


def test_a_client_that_drops_a_stream_aborts_it_and_frees_its_kv_blocks(live_url, api_key, engine):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "stream": True,
            "logit_bias": NO_EOS}  # no max_tokens: it would run to the end of the context
    with httpx.Client(timeout=30, headers=bearer(api_key)) as client:
        with client.stream("POST", live_url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for _, line in zip(range(8), lines)]
            assert any(line.startswith("data: ") for line in received)
            assert engine.num_kv_blocks_used > 0
    # the connection is closed: the request is aborted well before its 1000 tokens are out
    assert wait_until(lambda: engine.num_kv_blocks_used == 0 and not engine.has_unfinished_requests(), 5)


def test_a_client_that_drops_a_plain_request_aborts_it_too(live_url, api_key, engine):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "logit_bias": NO_EOS}
    with httpx.Client(timeout=0.3, headers=bearer(api_key)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(live_url + "/v1/chat/completions", json=body)
    assert wait_until(lambda: engine.num_kv_blocks_used == 0 and not engine.has_unfinished_requests(), 5)
