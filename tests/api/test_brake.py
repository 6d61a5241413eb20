"""The brake's stepped budgets, on a fake clock: charged before the attempt and all at once, so that
parallel attempts cannot pass one check together; a refused attempt costs nothing and is told when to
come back; a refund takes an attempt back. In the process and in Redis alike."""

from __future__ import annotations

import asyncio

import pytest

from mistral_serve.api.brake import Brake, Budget, Tier
from mistral_serve.api.counters import InProcessCounters, RedisCounters
from tests.api.helpers import FakeClock

HOUR_START = 1_800_000_000 // 3600 * 3600  # every window (minute, quarter, hour) starts here
STEPPED = Budget("account", (Tier(60, 5), Tier(15 * 60, 10), Tier(60 * 60, 20)))
ADDRESS = Budget("address", (Tier(60, 8),))


@pytest.fixture(params=["in-process", "redis"])
def make_counters(request):
    if request.param == "in-process":
        return InProcessCounters
    url = request.getfixturevalue("empty_redis_url")
    return lambda: RedisCounters(url)


def run(coroutine):
    return asyncio.run(coroutine)


async def outcomes(brake: Brake, subjects, num_attempts: int) -> list[int | None]:
    """Retry-After of each of `num_attempts` attempts made in order (None: let through)."""
    return [(await brake.charge(subjects)).retry_after_s for _ in range(num_attempts)]


def test_parallel_attempts_are_let_through_up_to_the_budget_and_no_further(make_counters):
    async def scenario():
        brake = Brake(make_counters(), FakeClock(HOUR_START))
        return await asyncio.gather(*(brake.charge([(STEPPED, "victim@example.com")]) for _ in range(30)))
    attempts = run(scenario())
    assert sum(not attempt.is_refused for attempt in attempts) == 5
    assert {attempt.retry_after_s for attempt in attempts if attempt.is_refused} == {60}


def test_the_wait_steps_up_from_the_minute_to_the_quarter_to_the_hour(make_counters):
    async def scenario():
        clock = FakeClock(HOUR_START)
        brake = Brake(make_counters(), clock)
        subject = [(STEPPED, "victim@example.com")]
        assert await outcomes(brake, subject, 6) == [None] * 5 + [60]
        clock.advance(60)
        assert await outcomes(brake, subject, 6) == [None] * 5 + [15 * 60 - 60]
        clock.advance(15 * 60 - 60)
        assert await outcomes(brake, subject, 5) == [None] * 5
        clock.advance(60)
        assert await outcomes(brake, subject, 6) == [None] * 5 + [60 * 60 - 16 * 60]  # 20 this hour
        clock.advance(60 * 60 - 16 * 60)
        assert await outcomes(brake, subject, 1) == [None]
    run(scenario())


def test_an_attempt_is_charged_to_all_its_budgets_or_to_none(make_counters):
    async def scenario():
        brake = Brake(make_counters(), FakeClock(HOUR_START))
        # 5 guesses at one email use it up; the refused 6th and 7th cost the address nothing
        both = [(STEPPED, "victim@example.com"), (ADDRESS, "192.0.2.1")]
        assert await outcomes(brake, both, 7) == [None] * 5 + [60] * 2
        assert await outcomes(brake, [(ADDRESS, "192.0.2.1")], 4) == [None] * 3 + [60]
        assert await outcomes(brake, [(STEPPED, "other@example.com")], 1) == [None]  # each subject its own count
    run(scenario())


def test_a_refunded_attempt_counts_no_more(make_counters):
    async def scenario():
        brake = Brake(make_counters(), FakeClock(HOUR_START))
        subject = [(STEPPED, "owner@example.com")]
        for _ in range(50):
            await brake.refund(await brake.charge(subject))
        assert await outcomes(brake, subject, 6) == [None] * 5 + [60]
    run(scenario())
