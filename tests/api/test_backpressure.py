"""Backpressure in one process: a bounded queue (503 at once), a queue timeout (503), a cap on each
key's requests in flight (429); and the key check riding out a database outage."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine, QueueLimits
from mistral_serve.engine.engine import EngineConfig
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, NO_EOS, ChatByteTokenizer, chat, new_key, serving, wait_until
from tests.api.helpers import SlowEngine
from tests.api.load import metric, stream_chat

LONG = chat(max_tokens=600, logit_bias=NO_EOS)  # runs for seconds on the tiny model, one at a time


@pytest.fixture
def one_at_a_time(tiny_model):
    """A slow engine that runs a single sequence at a time: every other request waits in its queue."""
    return SlowEngine(tiny_model, ChatByteTokenizer(),
                      EngineConfig(block_size=16, num_kv_blocks=128, max_num_seqs=1, seed=0))


def live(engine, api_db, tmp_path, **settings):
    served_with = Settings(data_dir=tmp_path, **settings)
    return serving(create_app(served_with, {MODEL_ID: AsyncEngine(engine, QueueLimits.from_settings(served_with))},
                              api_db))


def test_a_full_queue_answers_503_at_once_for_streams_too(one_at_a_time, api_db, tmp_path):
    key = new_key(api_db)
    with live(one_at_a_time, api_db, tmp_path, max_queued_requests=1) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                running = asyncio.create_task(stream_chat(client, url, key, LONG))
                assert await asyncio.to_thread(wait_until, lambda: metric(url, "mistral_serve_requests_running") == 1)
                queued = asyncio.create_task(stream_chat(client, url, key, LONG))
                assert await asyncio.to_thread(wait_until,
                                               lambda: metric(url, "mistral_serve_requests_waiting") == 1)
                refused_stream = await stream_chat(client, url, key, chat(max_tokens=1))
                refused = await client.post(url + "/v1/chat/completions", json=chat(max_tokens=1),
                                            headers={"Authorization": f"Bearer {key}"})
                for task in (running, queued):
                    task.cancel()
                await asyncio.gather(running, queued, return_exceptions=True)
                return refused_stream, refused
        refused_stream, refused = asyncio.run(scenario())
        assert wait_until(lambda: metric(url, "mistral_serve_kv_blocks_used") == 0)
    assert refused_stream.status == 503 and refused_stream.retry_after
    assert refused_stream.error["code"] == "server_overloaded"
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "server_overloaded" and "waiting" in refused.json()["error"]["message"]


def test_a_request_that_waits_past_the_queue_timeout_gets_503(one_at_a_time, api_db, tmp_path):
    key = new_key(api_db)
    with live(one_at_a_time, api_db, tmp_path, queue_timeout_s=0.5) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                running = asyncio.create_task(stream_chat(client, url, key, LONG))
                assert await asyncio.to_thread(wait_until, lambda: metric(url, "mistral_serve_requests_running") == 1)
                waited = await stream_chat(client, url, key, chat(max_tokens=1))
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                return waited
        waited = asyncio.run(scenario())
    assert waited.status == 503 and waited.retry_after
    assert "queue timeout" in waited.error["message"]


def test_a_key_past_its_concurrent_requests_gets_429_while_another_key_is_served(make_engine, api_db, tmp_path):
    busy, other = new_key(api_db), new_key(api_db, email="other@example.com")
    with live(make_engine(), api_db, tmp_path, max_concurrent_requests_per_key=1) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                first_token = asyncio.Event()
                running = asyncio.create_task(stream_chat(client, url, busy, LONG, on_first_content=first_token.set))
                await first_token.wait()
                second = await stream_chat(client, url, busy, chat(max_tokens=1))
                others = await stream_chat(client, url, other, chat(max_tokens=2))
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                return second, others
        second, others = asyncio.run(scenario())
        # the cancelled request's place is free again
        assert wait_until(lambda: httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=1), timeout=30,
                                             headers={"Authorization": f"Bearer {busy}"}).status_code == 200)
    assert second.status == 429 and second.retry_after == "1"
    assert second.error["code"] == "too_many_concurrent_requests"
    assert others.is_complete


def test_chat_stops_with_503_while_usage_cannot_be_recorded_and_resumes_after(make_engine, api_db, tmp_path):
    from fastapi.testclient import TestClient

    from mistral_serve.db.crud import UsageRecord
    from mistral_serve.db.usage_spool import UsageSpool

    key = new_key(api_db)
    settings = Settings(data_dir=tmp_path, max_usage_backlog_mb=1)
    # another replica's rows, more than a megabyte, held in its unsealed segment: they cannot be written yet
    other_replica = UsageSpool(settings.usage_spool_dir)
    for index in range(5000):
        other_replica.append(UsageRecord(request_id=f"chatcmpl-other-{index}", key_id=None, account_id=None,
                                         model="m" * 100, status="ok", http_status=200, duration_ms=1))
    app = create_app(settings, {MODEL_ID: AsyncEngine(make_engine())}, api_db)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        assert wait_until(lambda: client.get("/ready").json()["usage_backlog_bytes"] > 1 << 20)
        assert wait_until(lambda: app.state.serving.usage.backlog_bytes_seen > 1 << 20)
        refused = client.post("/v1/chat/completions", json=chat(max_tokens=1))
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "usage_backlog_full"
        other_replica.seal()  # the replica is back: its rows reach the database
        assert wait_until(lambda: client.get("/ready").json()["usage_backlog_bytes"] == 0, timeout=30)
        assert wait_until(lambda: client.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200)
