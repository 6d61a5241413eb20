"""Which member takes a request: pure functions of the members' names, their in-flight counts and the
request's affinity key, so that every gateway replica, in every process, makes the same choice.

Hashes are blake2b, never Python's `hash()`, which is salted per process.

Prefix affinity is consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018)
on a rendezvous ranking: the members ranked for a key, best first, and the first one under the
capacity ceil(load_factor × (total in flight + 1) / number of members) takes the request. Some member
is always under it, and the member that takes a request then carries no more than load_factor × the
mean + 1, the mean counting that request. Removing a member moves only the keys that ranked it
first. The loads are each gateway's own: replicas agree on the ranking, and each bounds the load it
sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import hashlib
import json
import math


def rendezvous_ranking(names: Iterable[str], key: str) -> list[str]:
    """`names` ordered for `key` by highest random weight, best first."""
    key_digest = hashlib.blake2b(key.encode(), digest_size=16).digest()

    def weight(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, key=key_digest).digest(), "big")

    return sorted(names, key=lambda name: (-weight(name), name))


def least_outstanding(in_flight: Mapping[str, int], key: str | None) -> str:
    """The member with the fewest requests in flight; ties go to the one ranked first for `key` (by
    name when there is no key), so the choice is the same everywhere."""
    order = rendezvous_ranking(in_flight, key) if key is not None else sorted(in_flight)
    return min(order, key=in_flight.__getitem__)  # min keeps the first of equals


def prefix_affinity(in_flight: Mapping[str, int], key: str | None, *, load_factor: float) -> str:
    """The first member in `key`'s ranking with room under the bounded load; with no key, the least
    outstanding."""
    if key is None:
        return least_outstanding(in_flight, None)
    capacity = math.ceil(load_factor * (sum(in_flight.values()) + 1) / len(in_flight))
    # with load_factor > 1 some member is under capacity: they cannot all carry more than the total
    return next(name for name in rendezvous_ranking(in_flight, key) if in_flight[name] < capacity)


def pick_member(policy: str, in_flight: Mapping[str, int], key: str | None, *, load_factor: float) -> str:
    """The member `policy` picks among `in_flight`'s (name → requests in flight), none of them empty."""
    if not in_flight:
        raise ValueError("no member to pick from")
    if policy == "least_outstanding":
        return least_outstanding(in_flight, key)
    if policy == "prefix_affinity":
        return prefix_affinity(in_flight, key, load_factor=load_factor)
    raise ValueError(f"unknown policy {policy!r}")


def affinity_key(messages: list[dict]) -> str | None:
    """The part of a conversation that decides its upstream, as a digest: the leading system (or
    developer) messages when there are any, else the conversation's first message; None for no
    messages.

    An application's requests share its system prompt, and every turn of a conversation shares its
    first message, so they reach the upstream that holds that prefix in its KV cache. An application
    with one system prompt would then lean on one member: the bounded load spills the excess to the
    next member in the ranking. Only roles and text take part (canonical JSON), so two requests that
    differ in other fields of those messages still meet."""
    if not messages:
        return None
    leading = []
    for message in messages:
        if message.get("role") not in ("system", "developer"):
            break
        leading.append(message)
    prefix = [[message.get("role"), _text_of(message.get("content"))] for message in leading or messages[:1]]
    canonical = json.dumps(prefix, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def _text_of(content) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return content if isinstance(content, str) else ""
