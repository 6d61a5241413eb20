"""The request ticket on its own: one usage row per request however it ends, the in-flight count
back where it was, the token reservation settled against what was generated."""

from __future__ import annotations

import asyncio

import pytest

from mistral_serve.api.admission import GenerationEnd, RequestTicket
from mistral_serve.api.errors import APIError
from mistral_serve.api.in_flight import InFlight
from mistral_serve.api.counters import InProcessCounters
from mistral_serve.api.limits import RateLimiter
from mistral_serve.db.crud import KeyLimits
from mistral_serve.db.key_store import ActiveKey
from tests.api.helpers import FakeClock


class FakeUsage:
    """The usage writer's surface the ticket uses: rows are kept in a list."""

    def __init__(self, backlog_bytes: int = 0):
        self.backlog_bytes_seen = backlog_bytes
        self.rows = []

    def record(self, row) -> None:
        self.rows.append(row)


KEY = ActiveKey(1, 1, "tests", "abcdefgh", KeyLimits(tokens_per_minute=1000))


def ticket_maker(usage: FakeUsage, in_flight: InFlight, limiter: RateLimiter | None = None):
    limiter = limiter or RateLimiter(InProcessCounters())
    return lambda: RequestTicket(KEY, "model", usage=usage, limiter=limiter, in_flight=in_flight,
                                 max_usage_backlog_mb=1)


def test_a_key_at_its_cap_is_refused_at_the_door_with_one_limited_row():
    usage, in_flight = FakeUsage(), InFlight(max_per_key=1)
    new_ticket = ticket_maker(usage, in_flight)

    async def scenario():
        async with new_ticket():
            with pytest.raises(APIError) as refusal:
                async with new_ticket():
                    pass
            assert in_flight.of_key(KEY.id) == 1  # the refused one was never counted
            return refusal.value
    refusal = asyncio.run(scenario())
    assert refusal.status_code == 429
    assert [(row.status, row.http_status) for row in usage.rows] == [("limited", 429), ("aborted", 499)]
    assert in_flight.total == 0


def test_a_full_usage_backlog_is_a_503_with_its_row():
    usage = FakeUsage(backlog_bytes=2 << 20)
    with pytest.raises(APIError) as refusal:
        asyncio.run(ticket_maker(usage, InFlight(max_per_key=1))().__aenter__())
    assert refusal.value.status_code == 503
    assert [(row.status, row.http_status) for row in usage.rows] == [("error", 503)]


def test_a_request_refused_for_its_content_ends_as_an_error_row_and_is_counted_out():
    usage, in_flight = FakeUsage(), InFlight(max_per_key=1)

    async def scenario():
        async with ticket_maker(usage, in_flight)():
            raise APIError(404, "no such model")
    with pytest.raises(APIError):
        asyncio.run(scenario())
    [row] = usage.rows
    assert (row.status, row.http_status, row.completion_tokens) == ("error", 404, 0)
    assert in_flight.total == 0


def test_a_stream_keeps_the_ticket_open_and_its_close_writes_the_one_row_and_settles():
    usage, in_flight = FakeUsage(), InFlight(max_per_key=2)
    clock = FakeClock()  # one window throughout
    limiter = RateLimiter(InProcessCounters(clock), clock=clock)
    new_ticket = ticket_maker(usage, in_flight, limiter)

    async def scenario():
        async with new_ticket() as ticket:
            await ticket.reserve(100, 1, 400, 400)  # charged 500
            headers = dict(ticket.headers)
            kept = ticket.keep_open()
        assert usage.rows == [] and in_flight.total == 1  # the stream still runs
        ticket.on_first_token()
        ticket.on_generation_end(GenerationEnd("ok", 200, 100, 0, 20, "stop"))
        kept.close()
        kept.close()  # the stream's end may be reported twice: still one row
        await limiter.drain()
        async with new_ticket() as after:
            await after.reserve(10, 1, None, 1)
            return headers, after.headers
    charged, after = asyncio.run(scenario())
    assert charged["x-ratelimit-remaining-tokens"] == "500"
    assert after["x-ratelimit-remaining-tokens"] == str(1000 - 120 - 11)  # 380 of the 500 given back
    ok = usage.rows[0]
    assert (ok.status, ok.http_status, ok.prompt_tokens, ok.completion_tokens) == ("ok", 200, 100, 20)
    assert ok.time_to_first_token_ms is not None
    assert len(usage.rows) == 2 and in_flight.total == 0
