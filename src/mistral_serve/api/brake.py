"""Brake: attempts counted against stepped budgets, charged atomically before the attempt is made.

A budget is a few tiers, each a most-attempts-per-window: 5 a minute, 10 a quarter of an hour, 20 an
hour. Windows are fixed and aligned to the clock (the window of time t is floor(t / window_s)), as
the rate limits' are, so every replica names the same window and, with Redis, adds to the same
count. An attempt is charged to every tier of every budget it falls under in one atomic `charge` of
the counters: it is admitted only if each tier has room, and then counts at once, so parallel
attempts can never all slip past a check that each of them passed. A refused attempt is charged
nothing and told how long to wait: until the end of the longest window that is full. The backoff
steps up as the attempts go on: a minute, then the rest of the quarter, then the rest of the hour.

Counter names carry a hash of what is counted (an email, an address), never the thing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import hashlib
import math
import time

from mistral_serve.api.counters import Charge, Clock, Counters


@dataclass(frozen=True)
class Tier:
    window_s: int
    max_attempts: int


@dataclass(frozen=True)
class Budget:
    kind: str  # what is counted: "account", "address", …; part of the counters' names
    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class Attempt:
    """An attempt that was let through (with what it was charged, to refund it) or refused."""

    charges: tuple[Charge, ...]
    retry_after_s: int | None = None  # None: let through

    @property
    def is_refused(self) -> bool:
        return self.retry_after_s is not None


class Brake:
    def __init__(self, counters: Counters, clock: Clock = time.time):
        self.counters = counters
        self.clock = clock

    async def charge(self, subjects: Sequence[tuple[Budget, str]]) -> Attempt:
        """One attempt by each (budget, subject), charged to every tier of each, all or none.
        Raises CountersUnavailable when the counters cannot be reached."""
        now = self.clock()
        charges = tuple(Charge(_name(budget.kind, subject, tier, now), 1, tier.max_attempts)
                        for budget, subject in subjects for tier in budget.tiers)
        tiers = [tier for budget, _ in subjects for tier in budget.tiers]
        ttl_s = 2 * max(tier.window_s for tier in tiers)  # one lifetime for all: a window's count outlives it a little
        is_admitted, values = await self.counters.charge(charges, ttl_s)
        if is_admitted:
            return Attempt(charges)
        full = [tier for tier, charge, value in zip(tiers, charges, values) if value + charge.amount > charge.limit]
        wait_s = max((math.floor(now / tier.window_s) + 1) * tier.window_s - now for tier in full)
        return Attempt((), retry_after_s=max(1, math.ceil(wait_s)))

    async def refund(self, attempt: Attempt) -> None:
        """Take back what `attempt` was charged (to the windows it was charged to)."""
        for charge in attempt.charges:
            await self.counters.add(charge.name, -charge.amount, 2 * _window_s(charge))


def _name(kind: str, subject: str, tier: Tier, now: float) -> str:
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"brake:{kind}:{digest}:{tier.window_s}:{math.floor(now / tier.window_s)}"


def _window_s(charge: Charge) -> int:
    return int(charge.name.split(":")[3])
