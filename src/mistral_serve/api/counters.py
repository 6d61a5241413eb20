"""Counters: named integers that expire, charged atomically. In the process (`InProcessCounters`) or
in Redis (`RedisCounters`, shared by every replica). The rate limits, budgets and the log-in brake
count with them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import time

SWEEP_INTERVAL_S = 60  # how often expired counters are dropped from memory
Clock = Callable[[], float]  # seconds since the epoch, as time.time


class CountersUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Charge:
    name: str
    amount: int
    limit: int


class Counters(ABC):
    """Named integer counters that expire."""

    @abstractmethod
    async def charge(self, charges: Sequence[Charge], ttl_s: int) -> tuple[bool, list[int]]:
        """Atomically: if every counter plus its amount stays within its limit, add the amounts and
        return (True, the new values); otherwise change nothing and return (False, the current values)."""

    @abstractmethod
    async def add(self, name: str, amount: int, ttl_s: int) -> None:
        """Add `amount` (negative: take away) to the counter `name`."""

    async def close(self) -> None:
        pass


class InProcessCounters(Counters):
    """Counters in a dict: one process's view. Used on the event loop only, so each call is atomic."""

    def __init__(self, clock: Clock = time.time):
        self.clock = clock
        self._counters: dict[str, list[float]] = {}  # name → [value, expires at]
        self._next_sweep = 0.0

    async def charge(self, charges: Sequence[Charge], ttl_s: int) -> tuple[bool, list[int]]:
        now = self.clock()
        self._may_sweep(now)
        values = [self._value(charge.name, now) for charge in charges]
        if any(value + charge.amount > charge.limit for value, charge in zip(values, charges)):
            return False, values
        for charge in charges:
            self._add(charge.name, charge.amount, ttl_s, now)
        return True, [self._value(charge.name, now) for charge in charges]

    async def add(self, name: str, amount: int, ttl_s: int) -> None:
        self._add(name, amount, ttl_s, self.clock())

    def _value(self, name: str, now: float) -> int:
        entry = self._counters.get(name)
        return int(entry[0]) if entry is not None and entry[1] > now else 0

    def _add(self, name: str, amount: int, ttl_s: int, now: float) -> None:
        self._counters[name] = [self._value(name, now) + amount, now + ttl_s]

    def _may_sweep(self, now: float) -> None:
        if now >= self._next_sweep:
            self._counters = {name: entry for name, entry in self._counters.items() if entry[1] > now}
            self._next_sweep = now + SWEEP_INTERVAL_S


# KEYS: the counters; ARGV: the time to live, then each counter's amount and limit
_CHARGE_SCRIPT = """
local values = {}
local admitted = 1
for i, key in ipairs(KEYS) do
  values[i] = tonumber(redis.call('GET', key) or '0')
  if values[i] + tonumber(ARGV[2 * i]) > tonumber(ARGV[2 * i + 1]) then admitted = 0 end
end
if admitted == 1 then
  for i, key in ipairs(KEYS) do
    values[i] = redis.call('INCRBY', key, ARGV[2 * i])
    redis.call('EXPIRE', key, ARGV[1])
  end
end
table.insert(values, 1, admitted)
return values
"""


class RedisCounters(Counters):
    """Counters in Redis, shared by every replica: a charge is one Lua script (atomic), an adjustment
    one INCRBY + EXPIRE transaction."""

    def __init__(self, url: str, prefix: str = "mistral-serve:limits:"):
        import redis.asyncio

        self.prefix = prefix
        self.redis = redis.asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._charge = self.redis.register_script(_CHARGE_SCRIPT)

    async def charge(self, charges: Sequence[Charge], ttl_s: int) -> tuple[bool, list[int]]:
        args = [ttl_s]
        for charge in charges:
            args += [charge.amount, charge.limit]
        try:
            admitted, *values = await self._charge(keys=[self.prefix + charge.name for charge in charges], args=args)
        except Exception as error:  # redis raises its own errors and OSError subclasses
            raise CountersUnavailable(str(error)) from error
        return bool(admitted), [int(value) for value in values]

    async def add(self, name: str, amount: int, ttl_s: int) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipeline:
                await pipeline.incrby(self.prefix + name, amount).expire(self.prefix + name, ttl_s).execute()
        except Exception as error:
            raise CountersUnavailable(str(error)) from error

    async def close(self) -> None:
        await self.redis.aclose()
