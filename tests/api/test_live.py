"""A real uvicorn on loopback: a dropped stream frees its KV blocks (the openai client: test_openai_client.py)."""

import httpx
import pytest

from tests.api.conftest import MODEL_ID, NO_EOS, bearer, wait_until


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
