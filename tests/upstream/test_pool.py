"""A pool against real upstreams on loopback: what it sends, which failures it retries on another
member (only before the first event), what it relays, and its requests in flight, back to 0 after
every path. Least outstanding with no key tries idle members in name order: "a" first."""

import asyncio
import logging

import pytest

from mistral_serve.upstream.config import UpstreamSpec
from mistral_serve.upstream.pool import (
    NoHealthyUpstreamError, UpstreamBrokenError, UpstreamMisconfiguredError, UpstreamRefusedError,
)
from mistral_serve.upstream.routing import rendezvous_ranking
from tests.upstream.conftest import (
    CHUNKS, Reply, chat_body, chunk, closed_port_url, pool_of, read, status_of, wait_for,
)

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"


async def test_a_stream_relays_every_event_and_sends_the_request_as_configured(fakes):
    [a] = fakes("a")
    body = chat_body(temperature=0)
    async with pool_of(a.spec(model="mistral-7b", token=TOKEN)) as pool:
        assert await read(pool, body) == ("a", CHUNKS)
    [received] = a.received
    assert received.headers["authorization"] == f"Bearer {TOKEN}"
    assert received.headers["x-request-id"] == "req-1"
    assert received.body == {**body, "model": "mistral-7b"}
    assert body["model"] == "m"  # the caller's body is left as it was
    assert pool.num_in_flight == 0 and status_of(pool, "a").num_requests == 1


async def test_without_a_model_or_token_of_its_own_the_served_id_goes_and_no_authorization(fakes):
    [a] = fakes("a")
    async with pool_of(a) as pool:
        await read(pool)
    assert a.received[0].body["model"] == "m" and "authorization" not in a.received[0].headers


async def test_a_finished_stream_leaves_its_connection_for_the_next_request(fakes):
    [a] = fakes("a")
    async with pool_of(a) as pool:
        await read(pool)
        await read(pool)
    assert a.received[0].client_port == a.received[1].client_port


@pytest.mark.parametrize("reply, kind", [
    (Reply(status=500), "server_error"),
    (Reply(status=503), "server_error"),
    (Reply(events=[], ending="eof"), "broken"),
    (Reply(events=[], ending="drop"), "broken"),
    (Reply(events=[], ending="done"), "broken"),  # [DONE] and nothing before it
    (Reply(events=[{"error": {"message": "out of memory", "type": "server_error"}}]), "server_error"),
    (Reply(events=[{"error": {"message": "boom", "type": "InternalServerError", "code": 500}}]), "server_error"),
])
async def test_a_failure_before_the_first_event_is_retried_on_another_member(fakes, reply, kind):
    a, b = fakes("a", "b")
    a.reply = reply
    async with pool_of(a, b) as pool:
        assert await read(pool) == ("b", CHUNKS)
    assert len(a.received) == len(b.received) == 1
    status = status_of(pool, "a")
    assert status.num_errors == {kind: 1} and status.num_failures == 1 and status.is_healthy
    assert pool.num_in_flight == 0


async def test_a_refused_connection_ejects_the_member_at_once_and_another_serves(fakes):
    [b] = fakes("b")
    async with pool_of(UpstreamSpec(closed_port_url(), name="a"), b) as pool:
        assert await read(pool) == ("b", CHUNKS)
        assert await read(pool) == ("b", CHUNKS)
    status = status_of(pool, "a")
    assert status.state == "ejected" and status.num_requests == 1 and status.num_errors == {"connect": 1}
    assert "ConnectError" in status.last_error
    assert pool.num_in_flight == 0


async def test_a_busy_member_is_passed_over_without_counting_a_failure(fakes):
    a, b = fakes("a", "b")
    a.reply = Reply(status=429)
    async with pool_of(a, b, failure_threshold=1) as pool:
        assert await read(pool) == ("b", CHUNKS)
    status = status_of(pool, "a")
    assert status.is_healthy and status.num_failures == 0 and status.num_errors == {"busy": 1}


async def test_a_member_that_stalls_before_its_first_event_times_out_and_another_serves(fakes):
    a, b = fakes("a", "b")
    a.reply = Reply(events=[], ending="stall")
    async with pool_of(a, b, read_timeout_s=1.0) as pool:
        assert await read(pool) == ("b", CHUNKS)
    assert status_of(pool, "a").num_errors == {"timeout": 1}
    assert await wait_for(lambda: a.num_disconnects == 1)  # the stalled request was given up, not left open


@pytest.mark.parametrize("ending", ["drop", "eof"])
async def test_a_stream_that_breaks_after_its_first_event_is_not_retried(fakes, ending):
    a, b = fakes("a", "b")
    a.reply = Reply(events=CHUNKS[:2], ending=ending)
    events = []
    async with pool_of(a, b) as pool:
        stream = await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
        assert pool.num_in_flight == 1
        with pytest.raises(UpstreamBrokenError):
            async for event in stream:
                events.append(event)
        await stream.aclose()
    assert events == CHUNKS[:2] and b.received == []
    assert status_of(pool, "a").num_errors == {"broken": 1}
    assert pool.num_in_flight == 0


async def test_an_error_event_about_the_request_reaches_the_caller_as_the_first_event(fakes):
    a, b = fakes("a", "b")
    error = {"error": {"message": "prompt too long", "type": "invalid_request_error", "code": 400}}
    a.reply = Reply(events=[error])
    async with pool_of(a, b, failure_threshold=1) as pool:
        assert await read(pool) == ("a", [error])
    assert b.received == [] and status_of(pool, "a").num_failures == 0


async def test_a_server_error_event_after_the_first_is_relayed_and_counts_against_the_member(fakes):
    a, b = fakes("a", "b")
    late_error = {"error": {"message": "the engine died", "type": "server_error"}}
    a.reply = Reply(events=[chunk(0), late_error])
    async with pool_of(a, b, failure_threshold=1) as pool:
        assert await read(pool) == ("a", [chunk(0), late_error])
        assert await read(pool) == ("b", CHUNKS)  # a is out of rotation
    assert len(b.received) == 1 and status_of(pool, "a").num_errors == {"server_error": 1}


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_refusal_of_the_request_is_relayed_without_retry_or_failure(fakes, status):
    a, b = fakes("a", "b")
    refusal = {"error": {"message": "This model's maximum context length is 32768 tokens",
                         "type": "invalid_request_error", "code": "context_length_exceeded"}}
    a.reply = Reply(status=status, body=refusal)
    async with pool_of(a, b, failure_threshold=1) as pool:
        with pytest.raises(UpstreamRefusedError) as refused:
            await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
    assert (refused.value.status_code, refused.value.body) == (status, refusal)
    assert b.received == []
    assert status_of(pool, "a").num_failures == 0 and status_of(pool, "a").is_healthy
    assert pool.num_in_flight == 0


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_misconfigured_member_counts_a_failure_and_another_serves(fakes, status):
    a, b = fakes("a", "b")
    a.reply = Reply(status=status)
    async with pool_of(a, b) as pool:
        assert await read(pool) == ("b", CHUNKS)
    assert status_of(pool, "a").num_errors == {"misconfigured": 1}


async def test_when_every_member_is_misconfigured_the_pool_says_so(fakes):
    a, b = fakes("a", "b")
    a.reply = b.reply = Reply(status=401, body={"error": {"message": "Invalid API key: s3cret"}})
    async with pool_of(a, b) as pool:
        with pytest.raises(UpstreamMisconfiguredError, match="a: HTTP 401.*b: HTTP 401") as refused:
            await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
    assert "s3cret" not in str(refused.value)  # the upstream's answer is never relayed
    assert pool.num_in_flight == 0


async def test_when_every_attempt_fails_no_upstream_is_healthy(fakes):
    a, b, c = fakes("a", "b", "c")
    a.reply = b.reply = c.reply = Reply(status=500)
    async with pool_of(a, b, c, max_attempts=2, health_interval_s=7.5) as pool:
        with pytest.raises(NoHealthyUpstreamError, match="a: HTTP 500; b: HTTP 500") as refused:
            await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
    assert refused.value.retry_after_s == 8
    assert (len(a.received), len(b.received), len(c.received)) == (1, 1, 0)  # at most max_attempts members
    assert pool.num_in_flight == 0


async def test_failures_in_a_row_take_a_member_out_of_rotation(fakes):
    a, b = fakes("a", "b")
    a.reply = Reply(status=502)
    async with pool_of(a, b, failure_threshold=2) as pool:
        for _ in range(4):
            assert await read(pool) == ("b", CHUNKS)
    assert len(a.received) == 2 and status_of(pool, "a").state == "ejected"


async def test_with_every_member_out_of_rotation_no_upstream_is_healthy(fakes):
    [a] = fakes("a")
    a.reply = Reply(status=500)
    async with pool_of(a, UpstreamSpec(closed_port_url(), name="b"), failure_threshold=1,
                       health_interval_s=0.2) as pool:
        with pytest.raises(NoHealthyUpstreamError):
            await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
        with pytest.raises(NoHealthyUpstreamError, match="no upstream of m is in rotation") as refused:
            await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
    assert refused.value.retry_after_s == 1
    assert [status.state for status in pool.members()] == ["ejected", "ejected"]


async def test_closing_a_stream_closes_its_connection_and_the_upstream_sees_it(fakes):
    [a] = fakes("a")
    a.reply = Reply(events=CHUNKS[:2], ending="stall")
    async with pool_of(a) as pool:
        stream = await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
        assert [await stream.__anext__(), await stream.__anext__()] == CHUNKS[:2]
        await stream.aclose()
        await stream.aclose()  # again: nothing more happens
        assert pool.num_in_flight == 0
        assert await wait_for(lambda: a.num_disconnects == 1)
        assert [event async for event in stream] == []
    assert status_of(pool, "a").num_failures == 0


async def test_a_stream_closed_by_another_task_ends_its_reader_quietly(fakes):
    """As when the gateway's client goes away while a task waits for the next event: the reader's
    iteration just ends, and the member is not blamed."""
    [a] = fakes("a")
    a.reply = Reply(events=CHUNKS[:1], ending="stall")
    async with pool_of(a) as pool:
        stream = await pool.open_stream(chat_body(), affinity_key=None, request_id="r")
        assert await stream.__anext__() == CHUNKS[0]
        reading = asyncio.ensure_future(asyncio.wait_for(_rest_of(stream), 30))
        await asyncio.sleep(0.1)  # the reader is waiting for the next event by now (or ends at once if not)
        await stream.aclose()
        assert await reading == []
        assert await wait_for(lambda: a.num_disconnects == 1)
    assert pool.num_in_flight == 0 and status_of(pool, "a").num_failures == 0


async def _rest_of(stream) -> list[dict]:
    return [event async for event in stream]


async def test_a_caller_cancelled_before_the_first_event_releases_the_member_and_its_connection(fakes):
    [a] = fakes("a")
    a.reply = Reply(events=[], ending="stall")
    async with pool_of(a) as pool:
        opening = asyncio.ensure_future(pool.open_stream(chat_body(), affinity_key=None, request_id="r"))
        assert await wait_for(lambda: len(a.received) == 1)
        assert pool.num_in_flight == 1
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert pool.num_in_flight == 0
        assert await wait_for(lambda: a.num_disconnects == 1)


async def test_streams_in_flight_are_counted_until_each_ends(fakes):
    a, b = fakes("a", "b")
    a.reply = b.reply = Reply(events=CHUNKS[:1], ending="stall")
    async with pool_of(a, b) as pool:
        streams = [await pool.open_stream(chat_body(), affinity_key=None, request_id=f"r{i}") for i in range(3)]
        assert pool.num_in_flight == 3
        assert [status.num_in_flight for status in pool.members()] == [2, 1]  # least outstanding, then a by name
        for stream in streams:
            await stream.aclose()
        assert pool.num_in_flight == 0 and [status.num_in_flight for status in pool.members()] == [0, 0]


async def test_prefix_affinity_sends_a_key_to_the_same_member_every_time(fakes):
    members = fakes("a", "b", "c")
    async with pool_of(*members, policy="prefix_affinity") as pool:
        for key in ("k1", "k2", "k3", "k4"):
            expected = rendezvous_ranking(["a", "b", "c"], key)[0]
            assert {(await read(pool, key=key))[0] for _ in range(3)} == {expected}


async def test_the_token_is_in_no_log_and_no_status(fakes, caplog):
    a, b = fakes("a", "b")
    a.reply = Reply(status=500)
    with caplog.at_level(logging.DEBUG):
        async with pool_of(a.spec(token=TOKEN), b.spec(token=TOKEN), failure_threshold=1, health_interval_s=0.2,
                           is_started=True) as pool:
            assert await read(pool) == ("b", CHUNKS)
            a.health_status = 503
            assert await wait_for(lambda: a.num_health_checks >= 3)
    assert "upstream a of m failed (server_error): HTTP 500" in caplog.text
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(pool.members()) and TOKEN not in repr(pool.spec)
    assert a.received[0].headers["authorization"] == f"Bearer {TOKEN}"
