"""The routing policies: the same choice in every process, the bounded load held exactly, and the
affinity key that keeps a conversation, and an application's system prompt, on one upstream."""

import json
import math
import os
import random
import subprocess
import sys

import pytest

from mistral_serve.upstream.routing import (
    affinity_key, least_outstanding, pick_member, prefix_affinity, rendezvous_ranking,
)

NAMES = [f"10.0.0.{i}:8000" for i in range(1, 6)]
KEYS = [f"key-{i}" for i in range(200)]


def test_two_processes_rank_members_alike():
    """Python salts hash() per process: the ranking must not depend on it, or gateway replicas would
    send one conversation to different upstreams."""
    script = ("import json, sys; from mistral_serve.upstream.routing import rendezvous_ranking; "
              f"print(json.dumps([rendezvous_ranking({NAMES!r}, key) for key in {KEYS[:50]!r}]))")
    rankings = []
    for seed in ("1", "2"):
        ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        rankings.append(json.loads(ran.stdout))
    assert rankings[0] == rankings[1] == [rendezvous_ranking(NAMES, key) for key in KEYS[:50]]


def test_rankings_spread_keys_and_ignore_the_order_members_are_listed_in():
    firsts = [rendezvous_ranking(NAMES, key)[0] for key in KEYS]
    assert set(firsts) == set(NAMES)  # every member is some keys' first choice
    assert all(rendezvous_ranking(list(reversed(NAMES)), key) == rendezvous_ranking(NAMES, key) for key in KEYS)


def test_removing_a_member_moves_only_the_keys_it_held():
    gone = NAMES[2]
    rest = [name for name in NAMES if name != gone]
    for key in KEYS:
        before, after = rendezvous_ranking(NAMES, key), rendezvous_ranking(rest, key)
        assert after == [name for name in before if name != gone]


def test_least_outstanding_picks_the_least_loaded_and_breaks_ties_alike_everywhere():
    assert least_outstanding({"a": 3, "b": 1, "c": 2}, "k") == "b"
    assert least_outstanding({"c": 0, "a": 0, "b": 1}, None) == "a"  # by name with no key
    for key in KEYS:
        tied = {name: 0 for name in NAMES}
        assert least_outstanding(tied, key) == rendezvous_ranking(NAMES, key)[0]


def test_prefix_affinity_keeps_a_key_on_its_member_while_it_has_room():
    in_flight = {name: 1 for name in NAMES}
    for key in KEYS:
        assert prefix_affinity(in_flight, key, load_factor=1.25) == rendezvous_ranking(NAMES, key)[0]


def test_prefix_affinity_spills_to_the_next_ranked_member_past_the_bound():
    key = KEYS[0]
    first, second = rendezvous_ranking(NAMES, key)[:2]
    # 5 members, 10 in flight: capacity ceil(1.25 × 11 / 5) = 3
    in_flight = {name: 2 for name in NAMES}
    in_flight[first] = 3
    in_flight[NAMES[0] if first != NAMES[0] else NAMES[1]] -= 1
    assert prefix_affinity(in_flight, key, load_factor=1.25) == second
    in_flight[first] = 2
    assert prefix_affinity(in_flight, key, load_factor=1.25) == first


def test_prefix_affinity_without_a_key_is_least_outstanding():
    assert prefix_affinity({"a": 2, "b": 1, "c": 1}, None, load_factor=1.25) == "b"


@pytest.mark.parametrize("load_factor", [1.25, 1.5, 2.0])
@pytest.mark.parametrize("num_keys", [1, 3, 1000])
def test_while_requests_arrive_no_member_carries_more_than_the_bound(load_factor, num_keys):
    """On few keys (one hot system prompt) or many, after each arrival every member carries at most
    ceil(load_factor × the mean)."""
    rng = random.Random(f"{load_factor}-{num_keys}")
    in_flight = {name: 0 for name in NAMES}
    for num_running in range(1, 500):
        in_flight[prefix_affinity(in_flight, f"key-{rng.randrange(num_keys)}", load_factor=load_factor)] += 1
        assert max(in_flight.values()) <= math.ceil(load_factor * num_running / len(NAMES))
        assert max(in_flight.values()) <= load_factor * num_running / len(NAMES) + 1


@pytest.mark.parametrize("load_factor", [1.25, 2.0])
@pytest.mark.parametrize("num_keys", [1, 1000])
def test_as_requests_come_and_go_each_lands_on_the_first_ranked_member_with_room(load_factor, num_keys):
    """The member a request lands on carries at most ceil(load_factor × the mean) with it, and it is
    the first in the key's ranking under that capacity."""
    rng = random.Random(f"{load_factor}-{num_keys}")
    in_flight = {name: 0 for name in NAMES}
    running: list[str] = []
    for _ in range(3000):
        if running and rng.random() < 0.45:
            in_flight[running.pop(rng.randrange(len(running)))] -= 1
            continue
        key = f"key-{rng.randrange(num_keys)}"
        capacity = math.ceil(load_factor * (len(running) + 1) / len(NAMES))
        chosen = prefix_affinity(in_flight, key, load_factor=load_factor)
        assert chosen == next(name for name in rendezvous_ranking(NAMES, key) if in_flight[name] < capacity)
        in_flight[chosen] += 1
        running.append(chosen)
        assert in_flight[chosen] <= capacity


def test_pick_member_follows_the_policy():
    in_flight = {"a": 5, "b": 0}
    key = next(key for key in KEYS if rendezvous_ranking(["a", "b"], key)[0] == "a")
    assert pick_member("least_outstanding", in_flight, key, load_factor=1.25) == "b"
    assert pick_member("prefix_affinity", {"a": 1, "b": 0}, key, load_factor=2.0) == "a"
    with pytest.raises(ValueError, match="unknown policy 'random'"):
        pick_member("random", in_flight, key, load_factor=1.25)
    with pytest.raises(ValueError, match="no member to pick from"):
        pick_member("least_outstanding", {}, key, load_factor=1.25)


SYSTEM = {"role": "system", "content": "You are a helpful assistant for Acme."}


def test_an_applications_requests_share_the_key_of_its_system_prompt():
    one = affinity_key([SYSTEM, {"role": "user", "content": "Hello"}])
    other = affinity_key([SYSTEM, {"role": "user", "content": "What is 2+2?"}])
    as_parts = affinity_key([{"role": "system", "content": [{"type": "text", "text": SYSTEM["content"]}]},
                             {"role": "user", "content": "Bonjour"}])
    assert one == other == as_parts
    assert one != affinity_key([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}])
    assert one != affinity_key([{"role": "developer", "content": SYSTEM["content"]}, {"role": "user", "content": "Hi"}])


def test_the_turns_of_a_conversation_share_the_key_of_its_first_message():
    turns = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a time"},
             {"role": "user", "content": "Go on"}]
    keys = {affinity_key(turns[:n]) for n in (1, 2, 3)}
    assert len(keys) == 1
    assert keys != {affinity_key([{"role": "user", "content": "Tell me a joke"}])}


def test_every_leading_system_message_is_part_of_the_key():
    second = {"role": "system", "content": "Answer in French."}
    assert affinity_key([SYSTEM, second, {"role": "user", "content": "a"}]) != affinity_key(
        [SYSTEM, {"role": "user", "content": "a"}])


def test_no_messages_no_key():
    assert affinity_key([]) is None
