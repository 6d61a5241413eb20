"""Active health checks: they take a failing member out of rotation and bring a recovered one back.
Checks run every 0.2 s here; every wait has a generous deadline, as the machine may be loaded."""

import pytest

from tests.upstream.conftest import CHUNKS, Reply, pool_of, read, status_of, wait_for

pytestmark = pytest.mark.anyio


async def test_a_member_whose_checks_fail_leaves_rotation_and_returns_when_they_pass(fakes):
    a, b = fakes("a", "b")
    async with pool_of(a, b, health_interval_s=0.2, is_started=True) as pool:
        a.health_status = 503
        assert await wait_for(lambda: status_of(pool, "a").state == "ejected")
        assert await read(pool) == ("b", CHUNKS)  # a, first by name, is passed over
        assert a.received == []
        a.health_status = 200
        assert await wait_for(lambda: status_of(pool, "a").state == "healthy")
        assert await read(pool) == ("a", CHUNKS)


async def test_a_member_ejected_by_failed_requests_returns_through_its_health_check(fakes):
    a, b = fakes("a", "b")
    a.reply = Reply(status=500)
    a.health_status = 503  # down for requests and checks alike
    async with pool_of(a, b, failure_threshold=1, health_interval_s=0.2, is_started=True) as pool:
        assert await read(pool) == ("b", CHUNKS)
        assert status_of(pool, "a").state == "ejected"
        a.reply, a.health_status = Reply(), 200
        assert await wait_for(lambda: status_of(pool, "a").state == "healthy")
        assert await read(pool) == ("a", CHUNKS)


async def test_a_member_that_went_away_is_ejected_by_its_check_before_any_request_fails(fakes):
    a, b = fakes("a", "b")
    async with pool_of(a, b, health_interval_s=0.2, is_started=True) as pool:
        a.stop()
        assert await wait_for(lambda: status_of(pool, "a").state == "ejected")
        assert await read(pool) == ("b", CHUNKS)
    assert status_of(pool, "a").num_failures == 0


async def test_checks_go_to_the_origin_with_the_token_and_stop_when_the_pool_closes(fakes):
    [a] = fakes("a")
    async with pool_of(a.spec(token="t0ken"), health_interval_s=0.2, is_started=True):
        assert await wait_for(lambda: a.num_health_checks >= 2)
    assert a.health_authorizations[-1] == "Bearer t0ken"
    num_checks = a.num_health_checks
    await wait_for(lambda: a.num_health_checks > num_checks, timeout_s=1.0)
    assert a.num_health_checks == num_checks
