"""Per-key limits: requests and tokens per minute, token budgets, and the headers that tell clients where
they stand. The clock is a fake one: windows reset by moving it, never by sleeping."""

import asyncio
from datetime import datetime, timezone

from fastapi.testclient import TestClient
import pytest
from sqlalchemy import select

from mistral_serve.api.app import create_app
from mistral_serve.api.errors import APIError
from mistral_serve.api.counters import InProcessCounters, RedisCounters
from mistral_serve.api.limits import RateLimiter, budget_period
from mistral_serve.db import crud
from mistral_serve.db.crud import KeyLimits
from mistral_serve.db.key_store import ActiveKey
from mistral_serve.db.models import Usage
from mistral_serve.db.plans import PlanLimits
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, NO_EOS, bearer, chat, sse_events
from tests.api.helpers import FakeClock

def active_key(key_id: int = 1, plan: PlanLimits = PlanLimits(), account_id: int = 1, **limits) -> ActiveKey:
    return ActiveKey(key_id, account_id, "tests", "abcdefgh", KeyLimits(**limits), plan=plan)


def run(coroutine):
    return asyncio.run(coroutine)


async def admit(limiter: RateLimiter, key: ActiveKey, num_prompt_tokens: int, max_tokens: int | None,
                n: int = 1, default_max_tokens: int = 4096):
    """Both steps, as the route takes them: the admission, and the most tokens per choice it got."""
    admission = await limiter.admit(key)
    num_per_choice = await limiter.reserve(admission, num_prompt_tokens, n, max_tokens, default_max_tokens)
    return admission, num_per_choice


# the limiter, on its own

def test_a_burst_above_the_rpm_limit_is_refused_until_the_window_resets():
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    key = active_key(requests_per_minute=3)

    async def burst(size: int) -> list:
        outcomes = []
        for _ in range(size):
            try:
                outcomes.append(await limiter.admit(key))
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
    admission = run(limiter.admit(active_key(key_id=2, requests_per_minute=3)))  # other keys are not counted
    assert admission.headers["x-ratelimit-remaining-requests"] == "2"


def test_tokens_are_charged_at_their_most_then_corrected_to_what_was_used():
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    key = active_key(tokens_per_minute=1000)

    async def scenario():
        first, _ = await admit(limiter, key, 100, 300)  # charged 400
        assert first.headers["x-ratelimit-remaining-tokens"] == "600"
        limiter.settle(first, 150)  # it used 150: 250 back
        await limiter.drain()
        return await admit(limiter, key, 100, 800)  # 900 does not fit after the first one's 150

    with pytest.raises(APIError) as refused:
        run(scenario())
    assert refused.value.detail.type == "tokens"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "850"
    assert "Limit 1000, Used 150, Requested 900" in refused.value.detail.message
    clock.advance(60)  # alone in a fresh window it runs
    admission, num_per_choice = run(admit(limiter, key, 100, 800))
    assert num_per_choice == 800 and admission.headers["x-ratelimit-remaining-tokens"] == "100"


def test_a_request_that_cannot_fit_the_tpm_limit_is_refused_for_good_or_lowered_when_it_left_max_tokens_out():
    """The attack: 50 tokens per minute, then n=4 and max_tokens=300 in one request used 1,231 tokens."""
    limiter = RateLimiter(InProcessCounters(FakeClock()), clock=FakeClock())
    key = active_key(tokens_per_minute=50)
    with pytest.raises(APIError) as too_large:
        run(admit(limiter, key, 20, 300, n=4))
    assert too_large.value.status_code == 429 and "Retry-After" not in (too_large.value.headers or {})
    assert "Request too large" in too_large.value.detail.message and "n" in too_large.value.detail.message
    admission, num_per_choice = run(admit(limiter, active_key(key_id=2, tokens_per_minute=50), 20, None, n=4))
    assert num_per_choice == 7 and admission.num_tokens_reserved == 20 + 4 * 7  # within the 50
    with pytest.raises(APIError):  # a prompt beyond the limit can never run
        run(admit(limiter, active_key(key_id=3, tokens_per_minute=1000), 1001, None))


def test_a_correction_after_the_window_ended_only_adds_tokens_beyond_the_charge():
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    key = active_key(tokens_per_minute=1000)

    async def scenario():
        under, _ = await admit(limiter, key, 10, 90)  # charged 100, uses 50
        over, _ = await admit(limiter, key, 10, 90)  # charged 100, uses 300
        clock.advance(60)
        limiter.settle(under, 50)  # no refund into a window it was never charged to
        limiter.settle(over, 300)  # the 200 beyond its charge count now
        await limiter.drain()
        admission, _ = await admit(limiter, key, 10, 1)
        return admission

    assert run(scenario()).headers["x-ratelimit-remaining-tokens"] == str(1000 - 200 - 11)


def test_the_plan_limits_the_account_over_all_its_keys():
    """Per-key limits are per key; the plan's are the account's: a second key does not double them."""
    limiter = RateLimiter(InProcessCounters(FakeClock()), clock=FakeClock())
    plan = PlanLimits(requests_per_minute=3)
    keys = [active_key(key_id=key_id, plan=plan) for key_id in (1, 2)]

    async def burst() -> list:
        outcomes = []
        for index in range(5):
            try:
                outcomes.append((await limiter.admit(keys[index % 2])).headers["x-ratelimit-remaining-requests"])
            except APIError as error:
                outcomes.append(error.detail.message)
        return outcomes

    outcomes = run(burst())
    assert outcomes[:3] == ["2", "1", "0"]
    assert all("your account's plan" in outcome for outcome in outcomes[3:])
    other_account = run(limiter.admit(active_key(key_id=3, account_id=2, plan=plan)))
    assert other_account.headers["x-ratelimit-remaining-requests"] == "2"


def test_the_tighter_of_the_owners_limit_and_the_operators_ceiling_applies():
    key = ActiveKey(1, 1, "tests", "abcdefgh", KeyLimits(requests_per_minute=10), KeyLimits(requests_per_minute=2))
    limiter = RateLimiter(InProcessCounters(FakeClock()), clock=FakeClock())
    assert run(limiter.admit(key)).headers["x-ratelimit-limit-requests"] == "2"


def test_a_budget_is_reserved_by_requests_in_flight_and_released_once_their_rows_count(api_db):
    """Two requests at once cannot both spend what is left of a budget; the first's reservation is
    lowered to what it used when it ends, and dropped once its usage row would be counted."""
    with api_db() as session:
        account = crud.create_account(session, "reserved@example.com", password=None)
        key_row, _ = crud.create_api_key(session, account, "k", KeyLimits(token_budget=100, budget_period="day"))
        key = ActiveKey(key_row.id, account.id, "k", key_row.prefix, KeyLimits(token_budget=100, budget_period="day"))
    clock = FakeClock()
    limiter = RateLimiter(InProcessCounters(clock), api_db, clock, reservation_hold_s=0.2)

    async def scenario():
        first, _ = await admit(limiter, key, 10, 50)  # reserves 60 of the 100
        with pytest.raises(APIError) as held:
            await admit(limiter, key, 10, 50)  # 60 more do not fit the 40 left
        lowered_admission, lowered = await admit(limiter, key, 10, None, default_max_tokens=1000)
        limiter.settle(first, 20)  # it used 20: 40 back now
        await limiter.drain()
        settled_admission, after_settle = await admit(limiter, key, 10, None, default_max_tokens=1000)
        limiter.settle(lowered_admission, 0)  # both end, using nothing
        limiter.settle(settled_admission, 0)
        await limiter.drain()
        await asyncio.sleep(0.5)  # the hold is over: the first's 20 are its usage row's to count now
        _, after_hold = await admit(limiter, key, 10, None, default_max_tokens=1000)
        await limiter.close()
        return held.value, lowered, after_settle, after_hold
    held, lowered, after_settle, after_hold = run(scenario())
    assert held.status_code == 429 and held.detail.code == "insufficient_quota"
    assert held.headers["Retry-After"]  # it fits once the others end
    assert lowered == 30  # 100 - 60 reserved - its own 10 prompt tokens
    assert after_settle == 40 - 10  # 40 came back (reserved now: 20 + 40)
    assert after_hold == 100 - 10  # all back: from now on the usage rows (none written here) count what was used


def test_a_key_without_limits_gets_no_headers_and_no_counters():
    counters = InProcessCounters()
    admission, num_per_choice = run(admit(RateLimiter(counters), active_key(), 10, None, default_max_tokens=500))
    assert admission.headers == {} and counters._counters == {} and num_per_choice == 500


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
                outcomes.append((await admit(replicas[index % 2], key, 100, 100))[0])
            except APIError as error:
                outcomes.append(error)
        replicas[0].settle(outcomes[0], 50)  # a correction from one replica is seen by the other
        await replicas[0].drain()
        clock.advance(60)
        fresh, _ = await admit(replicas[1], key, 100, 100)
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
    admission, num_per_choice = run(admit(limiter, active_key(requests_per_minute=1, tokens_per_minute=5), 10, 100))
    assert admission.headers == {} and num_per_choice == 100


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


def test_every_chat_answer_names_its_request_as_its_usage_row_does(http, limited_app, api_db, clock):
    clock.advance(60)
    key = limited_key(api_db, "named", requests_per_minute=2)
    answer = http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(key))
    streamed = http.post("/v1/chat/completions", json=chat(max_tokens=1, stream=True), headers=bearer(key))
    refused = http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(key))
    unknown = http.post("/v1/chat/completions", json=chat(model="no-such-model"), headers=bearer(key))
    assert answer.headers["x-request-id"] == answer.json()["id"]
    assert streamed.headers["x-request-id"] == sse_events(streamed.text)[0]["id"]
    assert refused.status_code == 429 and refused.headers["x-request-id"].startswith("chatcmpl-")
    assert unknown.status_code == 429  # counted first: over its rpm before its model is looked at
    assert limited_app.state.serving.usage.flush()
    with api_db() as session:
        rows = session.scalars(select(Usage.request_id).where(Usage.key_id == crud.find_key_by_raw(session, key).id))
        ids = set(rows)
    assert {answer.headers["x-request-id"], streamed.headers["x-request-id"], refused.headers["x-request-id"],
            unknown.headers["x-request-id"]} == ids


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
