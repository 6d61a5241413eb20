"""What a client sees when an engine of a pool fails, and what the gateway meters: real engine
processes behind a real gateway, reached directly or through smg (the SGLang Model Gateway) as the
pool's one upstream. An engine killed with SIGKILL, a client that leaves mid-stream, an engine
brought back."""

from __future__ import annotations

from contextlib import ExitStack
import json
import time
import uuid

import httpx
import pytest

from tests.api.conftest import bearer
from tests.api.servers import V3_MODEL_ID, mistral_serve
from tests.pools.cluster import (
    ENGINE_TOKEN, HEALTH_INTERVAL_S, LONG_CONTEXT, TOKEN_VARIABLE, engines, events_of, pools_file, running_on,
    usage_row, write_long_v3_checkpoint,
)
from tests.services import ServiceUnavailable
from tests.upstream.smg import smg_router

LONG_REPLY = {"max_tokens": 3000, "min_tokens": 3000, "temperature": 1.0}  # seconds: long enough to interrupt
SMG_HEALTH_INTERVAL_S = 1


@pytest.fixture(scope="module", params=["direct", "through smg"])
def cluster(request, tmp_path_factory, long_v3):
    """(gateway, engines, the gateway's database, how the pool reaches them)."""
    work = tmp_path_factory.mktemp("failures")
    with ExitStack() as stack:
        started = stack.enter_context(engines(work, long_v3, 2))
        if request.param == "direct":
            pools = pools_file(work / "pools.yaml", started)
        else:
            try:
                router = stack.enter_context(smg_router(
                    [engine.origin for engine in started], policy="cache_aware", worker_token=ENGINE_TOKEN,
                    log_path=work / "smg.log", extra_args=["--health-check-interval-secs", str(SMG_HEALTH_INTERVAL_S)]))
            except ServiceUnavailable as error:
                pytest.skip(str(error))
            pools = work / "pools.yaml"
            pools.write_text(json.dumps({"models": [{  # JSON is YAML
                "id": V3_MODEL_ID, "health_interval_s": HEALTH_INTERVAL_S, "max_model_len": LONG_CONTEXT, "upstreams": [
                    {"url": router, "name": "smg", "token_env": TOKEN_VARIABLE, "health_path": "/readiness"}]}]}))
        (work / "gateway").mkdir()
        gateway = stack.enter_context(mistral_serve(work / "gateway", "--pools-file", str(pools)))
        yield gateway, started, work / "gateway" / "data" / "mistral-serve.db", request.param


@pytest.fixture(scope="module")
def long_v3(tmp_path_factory):
    return write_long_v3_checkpoint(tmp_path_factory.mktemp("long-v3"))


def chat_body(text: str, **fields) -> dict:
    return {"model": V3_MODEL_ID, "messages": [{"role": "user", "content": text}], **fields}


def open_stream(gateway, body: dict) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", gateway.url + "/v1/chat/completions", json={**body, "stream": True},
                                   headers=bearer(gateway.key))
    return client, client.send(request, stream=True)


def test_a_client_that_leaves_frees_the_upstreams_kv_blocks_at_once(cluster):
    gateway, started, _, _ = cluster
    client, response = open_stream(gateway, chat_body("Tell me a long story.", **LONG_REPLY))
    lines = response.iter_lines()  # held: a line iterator that is dropped closes the connection
    for line in lines:  # past the role chunk: tokens are being generated
        if '"content": "' in line and '"role"' not in line:
            break
    engine = running_on(started, timeout_s=10)
    assert engine.metric("mistral_serve_kv_blocks_used") > 0
    response.close()
    client.close()
    left_at = time.monotonic()
    while engine.metric("mistral_serve_kv_blocks_used") > 0:
        assert time.monotonic() - left_at < 5, "the engine still holds the request's KV blocks"
        time.sleep(0.02)
    print(f"KV blocks freed {time.monotonic() - left_at:.3f} s after the client left")
    assert engine.metric("vllm:num_requests_running") == 0


def test_an_engine_killed_mid_stream(cluster):
    gateway, started, database, route = cluster
    body = chat_body("Count to a thousand.", stream_options={"include_usage": True, "continuous_usage_stats": True},
                     **LONG_REPLY)
    client, response = open_stream(gateway, body)
    assert response.status_code == 200
    lines = response.iter_lines()
    received = []
    while len(received) < 6:
        received += events_of([next(lines)])
    victim = running_on(started, timeout_s=10)
    victim.kill()
    received += events_of(lines)  # to the end: the stream must end, with an error event before [DONE]
    client.close()
    assert received[-1] == "[DONE]"
    *chunks, error = [json.loads(event) for event in received[:-1]]
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "upstream_failed", error
    assert all("choices" in chunk for chunk in chunks)
    delivered = chunks[-1]["usage"]["completion_tokens"]  # the usage of every chunk, as asked for
    assert 0 < delivered < LONG_REPLY["max_tokens"]
    row = usage_row(database, chunks[0]["id"])
    assert (row["completion_tokens"], row["finish_reason"], row["status"]) == (delivered, "cut", "error"), row
    assert row["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"]

    # the pool goes on: every request after succeeds (the dead engine is left for the live one)
    for index in range(20):
        reply = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(gateway.key), timeout=60,
                           json=chat_body(f"Question {index}?", max_tokens=3))
        assert reply.status_code == 200, reply.text

    # brought back on its port, it is in rotation again within the health checks' interval
    victim.start()
    back_at = time.monotonic()
    while not is_in_rotation(gateway, victim, route):
        assert time.monotonic() - back_at < 3 * max(HEALTH_INTERVAL_S, SMG_HEALTH_INTERVAL_S) + 5
        time.sleep(0.1)
    print(f"{victim.name} back in rotation {time.monotonic() - back_at:.2f} s after it was healthy again")
    served_before = victim.metric("mistral_serve_requests_total")
    for _ in range(20):  # prompts that share no prefix: no router keeps them where an earlier one went
        httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(gateway.key), timeout=60,
                   json=chat_body(f"{uuid.uuid4().hex} or not?", max_tokens=2))
    assert victim.metric("mistral_serve_requests_total") > served_before


def is_in_rotation(gateway, engine, route: str) -> bool:
    if route == "direct":
        members = httpx.get(gateway.url + "/ready", timeout=10).json()["upstreams"][V3_MODEL_ID]
        return any(member["name"] == engine.name and member["state"] == "healthy" for member in members)
    # through smg, its own health checks decide: both workers healthy again
    [member] = httpx.get(gateway.url + "/ready", timeout=10).json()["upstreams"][V3_MODEL_ID]
    readiness = httpx.get(member["url"].removesuffix("/v1") + "/readiness", timeout=10).json()
    return readiness["healthy_workers"] == readiness["total_workers"] == 2


def test_with_every_engine_down_the_gateway_answers_503_with_retry_after(cluster):
    gateway, started, _, route = cluster
    for engine in started:
        engine.kill()
    try:
        deadline = time.monotonic() + 30
        while True:
            reply = httpx.post(gateway.url + "/v1/chat/completions", headers=bearer(gateway.key), timeout=60,
                               json=chat_body("Anyone there?", max_tokens=2))
            if reply.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert reply.status_code == 503, reply.text
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"]["code"] == "no_healthy_upstream"
        assert "127.0.0.1" not in reply.text  # the upstreams are the operator's business
    finally:
        for engine in started:
            engine.start()
