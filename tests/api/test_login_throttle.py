"""The log-in brake's policy, on a fake clock: strangers are braked per email and per address, a
browser that logged in before only on its own count, and sign-ups per address."""

from __future__ import annotations

import asyncio

from mistral_serve.api.counters import InProcessCounters, RedisCounters
from mistral_serve.api.login_throttle import ACCOUNT, ADDRESS, DEVICE, SIGNUP, LoginThrottle
from tests.api.helpers import FakeClock

HOUR_START = 1_800_000_000 // 3600 * 3600
OWNER = "owner@example.com"
FIRST_STEP = {budget.kind: budget.tiers[0].max_attempts for budget in (ACCOUNT, ADDRESS, DEVICE, SIGNUP)}


def run(coroutine):
    return asyncio.run(coroutine)


def throttle() -> LoginThrottle:
    return LoginThrottle(InProcessCounters(), FakeClock(HOUR_START))


async def num_let_through(attempts) -> int:
    return sum([not (await attempt).is_refused for attempt in attempts])


def test_strangers_cannot_lock_the_owner_out_of_a_browser_that_logged_in_before():
    async def scenario():
        brake = throttle()
        # wrong passwords for the owner's email from a hundred addresses: the email's budget is spent
        strangers = [brake.charge_password(OWNER, f"198.51.100.{n}", None) for n in range(100)]
        assert await num_let_through(strangers) == FIRST_STEP["account"]
        assert (await brake.charge_password(OWNER, "192.0.2.7", None)).is_refused  # the owner, on a new browser
        assert not (await brake.charge_password(OWNER, "192.0.2.7", "owners-laptop")).is_refused
    run(scenario())


def test_a_device_is_braked_on_its_own_count_and_charges_no_one_else():
    async def scenario():
        brake = throttle()
        own = [brake.charge_password(OWNER, "192.0.2.7", "owners-laptop") for _ in range(20)]
        assert await num_let_through(own) == FIRST_STEP["device"]
        assert not (await brake.charge_password(OWNER, "192.0.2.7", "owners-phone")).is_refused
        assert not (await brake.charge_password(OWNER, "192.0.2.7", None)).is_refused
    run(scenario())


def test_one_address_is_braked_whatever_emails_it_tries_and_its_neighbours_are_not():
    async def scenario():
        brake = throttle()
        spray = [brake.charge_password(f"user{n}@example.com", "203.0.113.9", None) for n in range(50)]
        assert await num_let_through(spray) == FIRST_STEP["address"]
        assert not (await brake.charge_password("user0@example.com", "203.0.113.10", None)).is_refused
    run(scenario())


def test_right_passwords_refunded_leave_room_for_everyone_behind_one_address():
    async def scenario():
        brake = throttle()
        for n in range(100):  # a hundred colleagues behind one NAT log in
            attempt = await brake.charge_password(f"colleague{n}@example.com", "203.0.113.1", None)
            assert not attempt.is_refused
            await brake.refund(attempt)
    run(scenario())


def test_sign_ups_are_counted_per_address():
    async def scenario():
        brake = throttle()
        assert await num_let_through([brake.charge_signup("203.0.113.5") for _ in range(20)]) == FIRST_STEP["signup"]
        refused = await brake.charge_signup("203.0.113.5")
        assert refused.retry_after_s == 60 * 60
        assert not (await brake.charge_signup("203.0.113.6")).is_refused
    run(scenario())


def test_unreachable_counters_let_attempts_through():
    brake = LoginThrottle(RedisCounters("redis://127.0.0.1:1/0"))  # nothing listens on port 1

    async def scenario():
        attempt = await brake.charge_password(OWNER, "192.0.2.7", None)
        await brake.refund(attempt)
        return attempt
    assert not run(scenario()).is_refused
