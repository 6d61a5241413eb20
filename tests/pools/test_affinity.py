"""Prefix affinity with bounded load, on three real engines: 12 distinct system prompts × 6 requests at
concurrency 8 — each prompt stays on one engine (its KV prefix cache reused), no engine carries more
than 1.25 × the mean + 1 requests in flight, and two gateway replicas pick alike.

The pool is driven directly (the gateway's own UpstreamPool, as PooledModel drives it) so that each
request's upstream can be read off its stream; the gateway's /metrics show the same split."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from mistral_serve.upstream.config import PoolSpec, UpstreamSpec
from mistral_serve.upstream import pool as pool_module
from mistral_serve.upstream.pool import UpstreamPool
from mistral_serve.upstream.routing import affinity_key, pick_member
from tests.api.servers import V3_MODEL_ID
from tests.pools.cluster import ENGINE_TOKEN, engines

NUM_PROMPTS, NUM_PER_PROMPT, CONCURRENCY = 12, 6, 8
SYSTEM_PROMPTS = [f"You are assistant number {index}; you answer in the style of school {index * 7 % 13}."
                  for index in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def three_engines(tmp_path_factory, tiny_v3):
    with engines(tmp_path_factory.mktemp("affinity"), tiny_v3, 3) as started:
        yield started


def pool_of(started) -> UpstreamPool:
    # health checks that wait long: three engines and the test share two cores, and a check that times
    # out takes an engine out of rotation (the bound is then over the two left)
    return UpstreamPool(PoolSpec(V3_MODEL_ID, tuple(UpstreamSpec(engine.base_url, token=ENGINE_TOKEN, name=engine.name)
                                                    for engine in started), health_timeout_s=30))


def conversation(prompt_index: int, request_index: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPTS[prompt_index]},
            {"role": "user", "content": f"Question {request_index} of a user of app {prompt_index}?"}]


async def run_all(pool: UpstreamPool, loads: list[dict[str, int]]) -> list[tuple[int, str]]:
    """Every request, in rounds across the prompts, 8 at a time: (prompt, upstream) of each."""
    requests = [(prompt, request) for request in range(NUM_PER_PROMPT) for prompt in range(NUM_PROMPTS)]
    places = []
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: int, request: int) -> None:
        async with slots:
            messages = conversation(prompt, request)
            body = {"model": V3_MODEL_ID, "messages": messages, "max_tokens": 24, "min_tokens": 24, "stream": True}
            stream = await pool.open_stream(body, affinity_key=affinity_key(messages), request_id=f"r{prompt}-{request}")
            places.append((prompt, stream.member_name))
            async with stream:
                async for _ in stream:
                    pass

    await pool.start()
    try:
        await asyncio.gather(*(one(prompt, request) for prompt, request in requests))
    finally:
        await pool.close()
    return places


def test_each_prefix_stays_on_one_upstream_within_the_load_bound(three_engines, monkeypatch):
    # each placement: the in-flight counts of the upstreams it chose among, the new request included, and
    # the one chosen. The bound is the placement's: an upstream placed at the bound stays there while
    # requests end elsewhere and the mean drops, as no router can take back a request it has sent
    loads = []

    def recorded_pick(policy, in_flight, key, *, load_factor):
        chosen = pick_member(policy, in_flight, key, load_factor=load_factor)
        loads.append(({**in_flight, chosen: in_flight[chosen] + 1}, chosen))
        return chosen
    monkeypatch.setattr(pool_module, "pick_member", recorded_pick)
    places = asyncio.run(run_all(pool_of(three_engines), loads))
    assert len(places) == NUM_PROMPTS * NUM_PER_PROMPT
    by_prompt = [Counter(member for prompt, member in places if prompt == index) for index in range(NUM_PROMPTS)]
    num_on_their_upstream = sum(counts.most_common(1)[0][1] for counts in by_prompt)
    print(f"{num_on_their_upstream} of {len(places)} requests on their prompt's upstream; "
          f"per upstream: {Counter(member for _, member in places)}")
    # Rendezvous hashing sends these 12 prompts 5/5/2 to the three engines, so at concurrency 8 the two
    # busier ones reach the 1.25 × mean bound and spill about one request in ten to their second
    # choice: the 95 % holds for an even split only (README "Scaling out" says so)
    assert num_on_their_upstream >= 0.85 * len(places)
    assert len(loads) >= len(places)  # one pick a request, and one more for each retry
    for in_flight, chosen in loads:
        mean = sum(in_flight.values()) / len(in_flight)
        assert in_flight[chosen] <= 1.25 * mean + 1, (in_flight, chosen)
    # the prompts spread over the upstreams: each one is some prompt's home
    assert {counts.most_common(1)[0][0] for counts in by_prompt} == {engine.name for engine in three_engines}


def test_two_gateway_replicas_pick_the_same_upstream_for_a_prefix(three_engines):
    async def picks() -> list[str]:
        pool = pool_of(three_engines)  # a replica of its own: nothing shared but the upstreams
        chosen = []
        try:
            for prompt in range(NUM_PROMPTS):
                messages = conversation(prompt, 0)
                body = {"model": V3_MODEL_ID, "messages": messages, "max_tokens": 1, "stream": True}
                async with await pool.open_stream(body, affinity_key=affinity_key(messages),
                                                  request_id=f"p{prompt}") as stream:
                    chosen.append(stream.member_name)
                    async for _ in stream:
                        pass
        finally:
            await pool.close()
        return chosen

    first, second = asyncio.run(picks()), asyncio.run(picks())
    assert first == second
    assert len(set(first)) == 3
