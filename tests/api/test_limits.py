"""Per-key limits: requests and tokens per minute, token budgets, and the headers that tell clients where
they stand. The clock is a fake one: windows reset by moving it, never by sleeping."""

import asyncio
from datetime import datetime, timezone

from fastapi.testclient import TestClient
import pytest

from mistral_serve.api.app import create_app
from mistral_serve.api.errors import APIError
from mistral_serve.api.limits import InProcessCounters, RateLimiter, RedisCounters, budget_period
from mistral_serve.db import crud
from mistral_serve.db.crud import KeyLimits
from mistral_serve.db.key_store import ActiveKey
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, NO_EOS, bearer, chat, sse_events
from tests.api.helpers import FakeClock

def active_key(key_id: int = 1, **limits) -> ActiveKey:
    return ActiveKey(key_id, 1, "tests", "abcdefgh", KeyLimits(**limits))


def run(coroutine):
    return asyncio.run(coroutine)


# the limiter, on its own

def test_a_burst_above_the_rpm_limit_is_refused_until_the_window_resets():
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    key = active_key(requests_per_minute=3)

    async def burst(size: int) -> list:
        outcomes = []
        for _ in range(size):
            try:
                outcomes.append(await limiter.admit(key, 10, 10))
            except APIError as error:
                outcomes.append(error)
        return outcomes

    first = run(burst(5))
    assert [admission.headers["x-ratelimit-remaining-requests"] for admission in first[:3]] == ["2", "1", "0"]
    assert first[0].headers == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
                                "x-ratelimit-reset-requests": "50s"}
    for refusal in first[3:]:
        assert refusal.status_code == 429
        assert refusal.detail.type == "requests" and refusal.detail.code == "rate_limit_exceeded"
        assert "Limit 3, Used 3, Requested 1" in refusal.detail.message
        assert refusal.headers["Retry-After"] == "50"
        assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(49.5)
    refusal = run(burst(1))[0]
    assert refusal.headers["Retry-After"] == "1" and refusal.headers["x-ratelimit-reset-requests"] == "500ms"
    clock.advance(0.5)  # the next minute
    assert [admission.headers["x-ratelimit-remaining-requests"] for admission in run(burst(3))] == ["2", "1", "0"]
    assert other_keys_are_not_counted(limiter)


def other_keys_are_not_counted(limiter: RateLimiter) -> bool:
    admission = run(limiter.admit(active_key(key_id=2, requests_per_minute=3), 1, 1))
    return admission.headers["x-ratelimit-remaining-requests"] == "2"


def test_tokens_are_charged_at_their_most_then_corrected_to_what_was_used():
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    key = active_key(tokens_per_minute=1000)

    async def scenario():
        first = await limiter.admit(key, 100, 300)  # charged 400
        assert first.headers["x-ratelimit-remaining-tokens"] == "600"
        limiter.settle(first, 150)  # it used 150: 250 back
        await limiter.drain()
        second = await limiter.admit(key, 100, 5000)  # more than a minute's worth: charged the limit...
        return second

    with pytest.raises(APIError) as refused:  # ...which does not fit after the first one's 150
        run(scenario())
    assert refused.value.detail.type == "tokens"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "850"
    assert "Limit 1000, Used 150, Requested 1000" in refused.value.detail.message

    clock.advance(60)  # alone in a fresh window it runs
    assert run(limiter.admit(key, 100, 5000)).headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(APIError) as too_large:  # a prompt beyond the limit can never run
        run(limiter.admit(active_key(key_id=3, tokens_per_minute=1000), 1001, 1))
    assert too_large.value.status_code == 429 and "Retry-After" not in (too_large.value.headers or {})


def test_a_correction_after_the_window_ended_only_adds_tokens_beyond_the_charge():
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    key = active_key(tokens_per_minute=1000)

    async def scenario():
        under = await limiter.admit(key, 10, 90)  # charged 100, uses 50
        over = await limiter.admit(key, 10, 90)  # charged 100, uses 300
        clock.advance(60)
        limiter.settle(under, 50)  # no refund into a window it was never charged to
        limiter.settle(over, 300)  # the 200 beyond its charge count now
        await limiter.drain()
        return await limiter.admit(key, 10, 0)

    assert run(scenario()).headers["x-ratelimit-remaining-tokens"] == str(1000 - 200 - 10)


def test_a_key_without_limits_gets_no_headers_and_no_counters():
    counters = InProcessCounters()
    admission = run(RateLimiter(counters).admit(active_key(), 10, 10))
    assert admission.headers == {} and counters._counters == {}


def test_budget_periods_are_utc_days_and_calendar_months():
    moment = datetime(2024, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp()
    assert budget_period("day", moment) == (datetime(2024, 12, 31, tzinfo=timezone.utc),
                                            datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert budget_period("month", moment) == (datetime(2024, 12, 1, tzinfo=timezone.utc),
                                              datetime(2025, 1, 1, tzinfo=timezone.utc))


# Redis: two replicas, one limit

def test_two_replicas_sharing_redis_enforce_one_limit(empty_redis_url):
    clock = FakeClock()
    key = active_key(requests_per_minute=4, tokens_per_minute=10_000)

    async def scenario():
        replicas = [RateLimiter(RedisCounters(empty_redis_url), clock=clock) for _ in range(2)]
        outcomes = []
        for index in range(6):
            try:
                outcomes.append(await replicas[index % 2].admit(key, 100, 100))
            except APIError as error:
                outcomes.append(error)
        replicas[0].settle(outcomes[0], 50)  # a correction from one replica is seen by the other
        await replicas[0].drain()
        clock.advance(60)
        fresh = await replicas[1].admit(key, 100, 100)
        for replica in replicas:
            await replica.close()
        return outcomes, fresh

    outcomes, fresh = run(scenario())
    assert [o.headers["x-ratelimit-remaining-requests"] for o in outcomes[:4]] == ["3", "2", "1", "0"]
    assert [o.headers["x-ratelimit-remaining-tokens"] for o in outcomes[:4]] == ["9800", "9600", "9400", "9200"]
    assert all(isinstance(o, APIError) and o.status_code == 429 and o.detail.type == "requests"
               for o in outcomes[4:])
    assert fresh.headers["x-ratelimit-remaining-requests"] == "3"


def test_an_unreachable_redis_lets_requests_through():
    limiter = RateLimiter(RedisCounters("redis://127.0.0.1:1/0"))  # nothing listens on port 1
    admission = run(limiter.admit(active_key(requests_per_minute=1), 10, 10))
    assert admission.headers == {}


# over HTTP

@pytest.fixture(scope="module")
def clock():
    return FakeClock()


@pytest.fixture(scope="module")
def limited_app(engine, api_db, tmp_path_factory, clock):
    limiter = RateLimiter(InProcessCounters(clock), api_db, clock)
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(engine)}, api_db, limiter=limiter)


@pytest.fixture(scope="module")
def http(limited_app):
    with TestClient(limited_app) as client:
        yield client


def limited_key(db, name: str, **limits) -> str:
    with db() as session:
        account = (crud.get_account_by_email(session, "limits@example.com")
                   or crud.create_account(session, "limits@example.com", password=None))
        return crud.create_api_key(session, account, name, KeyLimits(**limits))[1]


def test_over_http_a_burst_gets_429s_in_the_openai_envelope(http, api_db, clock):
    key = limited_key(api_db, "burst", requests_per_minute=2, tokens_per_minute=1000)
    ok = [http.post("/v1/chat/completions", json=chat(max_tokens=2, logit_bias=NO_EOS), headers=bearer(key)),
          http.post("/v1/chat/completions", json=chat(max_tokens=2, logit_bias=NO_EOS, stream=True),
                    headers=bearer(key))]
    refused = http.post("/api/ai/chat/completions", json=chat(max_tokens=2), headers=bearer(key))
    assert [response.status_code for response in ok] == [200, 200]
    assert sse_events(ok[1].text)[-1] == "[DONE]"
    for response, remaining in zip(ok, ["1", "0"]):
        assert response.headers["x-ratelimit-limit-requests"] == "2"
        assert response.headers["x-ratelimit-remaining-requests"] == remaining
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert response.headers["x-ratelimit-limit-tokens"] == "1000"
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 1000
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    error = refused.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and error["param"] is None
    clock.advance(60)
    assert http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(key)).status_code == 200


def test_over_http_a_spent_budget_is_refused_until_it_renews(http, limited_app, api_db, clock):
    key = limited_key(api_db, "budget", token_budget=30, budget_period="day")
    usage = limited_app.state.serving.usage
    first = http.post("/v1/chat/completions", json=chat(max_tokens=10, logit_bias=NO_EOS), headers=bearer(key))
    assert first.status_code == 200 and "x-ratelimit-limit-requests" not in first.headers
    assert first.json()["usage"]["total_tokens"] > 15  # more than half the budget
    assert usage.flush()
    refused = http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(key))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    clock.advance(86400)
    assert http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(key)).status_code == 200
