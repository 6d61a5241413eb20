"""A request that breaks the model run, over HTTP: it alone gets a 500 in the error envelope; the
requests that shared its batch stream on to their end with the text they would have had anyway."""

from __future__ import annotations

import asyncio

import httpx

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.engine.engine import EngineConfig
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, ChatByteTokenizer, bearer, chat, new_key, serving, wait_until
from tests.api.helpers import SlowEngine
from tests.api.load import metric, stream_chat
from tests.engine.helpers import FaultyModel

POISON_TEXT = "\u2620"  # its last UTF-8 byte, 0xA0, is the token that breaks the model run
POISON = POISON_TEXT.encode()[-1]
# healthy requests never generate the poison byte (nor the end of sequence), so they run to max_tokens
HEALTHY = chat(max_tokens=40, temperature=0, logit_bias={"0": -100, str(POISON): -100})


def test_a_request_that_breaks_the_model_run_fails_alone_with_a_500(tiny_model, api_db, tmp_path):
    engine = SlowEngine(tiny_model, ChatByteTokenizer(), EngineConfig(block_size=16, num_kv_blocks=128, seed=0))
    engine.runner.model = FaultyModel(engine.runner.model, poison=POISON)
    key = new_key(api_db)
    app = create_app(Settings(data_dir=tmp_path), {MODEL_ID: AsyncEngine(engine)}, api_db)
    poisoned = chat(messages=[{"role": "user", "content": f"Hello {POISON_TEXT}"}])
    with serving(app) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                healthy = [asyncio.create_task(stream_chat(client, url, key, HEALTHY)) for _ in range(3)]
                assert await asyncio.to_thread(wait_until, lambda: metric(url, "mistral_serve_requests_running") == 3)
                failed = await client.post(url + "/v1/chat/completions", json=poisoned, headers=bearer(key))
                failed_stream = await stream_chat(client, url, key, poisoned)
                return failed, failed_stream, await asyncio.gather(*healthy)
        failed, failed_stream, healthy = asyncio.run(scenario())
        with httpx.Client(timeout=60) as client:
            alone = client.post(url + "/v1/chat/completions", json=HEALTHY, headers=bearer(key)).json()
        assert wait_until(lambda: metric(url, "mistral_serve_kv_blocks_used") == 0)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert failed_stream.status == 500 and failed_stream.error["type"] == "server_error"
    for outcome in healthy:
        assert outcome.error is None and outcome.finish_reason == "length" and outcome.saw_done
        assert outcome.usage["completion_tokens"] == 40
        assert outcome.text == alone["choices"][0]["message"]["content"]
