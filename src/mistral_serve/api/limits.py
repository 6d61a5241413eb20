"""Per-key limits, checked as a chat request is admitted: requests and tokens per minute, and a token
budget per day or month.

Windows: requests and tokens per minute are counted in fixed one-minute windows aligned to the
clock (the window of time t is floor(t / 60)), so every replica names the same window and, with
Redis, adds to the same count. A fixed window can let a key through at up to twice its rate across a
window boundary; in exchange a count is one integer per window and the reset headers are exact.

Tokens per minute: at admission a request is charged its prompt plus the most it may generate
(n × max_tokens, or n × the rest of the context when max_tokens is not given), capped at the limit,
so that a request asking for more than a minute's worth can still run alone in a fresh window. A
prompt larger than the limit can never run and is refused without Retry-After. When the request
ends, the charge is corrected to the tokens it used (prompt + completion): the difference goes back
to (or is added to) the admission window while it is current; once a newer window has begun, only
tokens beyond the charge are added, to the current window.

Budgets: a key's budget per UTC day or calendar month is checked against the sum of its usage rows
in the period (one indexed query, only for keys that have a budget). A request is refused when its
prompt would take the spent tokens past the budget. Rows reach the database within a fraction of a
second; requests still running are not yet counted, so concurrent requests can overrun a budget by
what they generate.

Counters live in the process (`InProcessCounters`) or in Redis (`RedisCounters`, shared by every
replica). If Redis or the database cannot be reached, requests are let through and a warning is
logged: an outage of the limiter does not stop serving.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
import logging
import math
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve.api.errors import APIError
from mistral_serve.db import crud
from mistral_serve.db.key_store import ActiveKey

log = logging.getLogger(__name__)

WINDOW_S = 60
COUNTER_TTL_S = 2 * WINDOW_S  # a window's counters outlive it a little, then expire
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
            self._next_sweep = now + WINDOW_S


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


@dataclass(frozen=True)
class Admission:
    """A request let through: what it was charged, and the headers that tell the client where it stands."""

    key_id: int
    window: int
    num_tokens_charged: int | None  # None: the key has no tokens-per-minute limit
    headers: dict[str, str]


class RateLimiter:
    """Admits requests within their key's limits (429 otherwise) and corrects token charges after."""

    def __init__(self, counters: Counters, sessions: sessionmaker[Session] | None = None, clock: Clock = time.time):
        self.counters = counters
        self.sessions = sessions  # where usage rows are summed for budgets; None: budgets unchecked
        self.clock = clock
        self._corrections: set[asyncio.Task] = set()

    async def admit(self, key: ActiveKey, num_prompt_tokens: int, max_num_completion_tokens: int) -> Admission:
        """Charge one request of `key` to its windows, or raise a 429 APIError that says when to retry."""
        limits = key.limits
        now = self.clock()
        window = math.floor(now / WINDOW_S)
        if limits.token_budget is not None:
            await self._check_budget(key, num_prompt_tokens, now)
        charges = []
        if limits.requests_per_minute is not None:
            charges.append(Charge(_counter_name(key.id, "requests", window), 1, limits.requests_per_minute))
        num_tokens_charged = None
        if limits.tokens_per_minute is not None:
            if num_prompt_tokens > limits.tokens_per_minute:
                raise APIError(429, f"Request too large for tokens per min (TPM) on key msk-{key.prefix}…: Limit "
                                    f"{limits.tokens_per_minute}, Requested {num_prompt_tokens}. Shorten the "
                                    "messages.", type="tokens", code="rate_limit_exceeded")
            num_tokens_charged = min(num_prompt_tokens + max_num_completion_tokens, limits.tokens_per_minute)
            charges.append(Charge(_counter_name(key.id, "tokens", window), num_tokens_charged,
                                  limits.tokens_per_minute))
        if not charges:
            return Admission(key.id, window, None, {})
        try:
            is_admitted, values = await self.counters.charge(charges, COUNTER_TTL_S)
        except CountersUnavailable as error:
            log.warning("rate limits not enforced: the counters are unavailable (%s)", error)
            return Admission(key.id, window, None, {})
        reset_s = (window + 1) * WINDOW_S - now
        headers = _headers(charges, values, reset_s)
        if not is_admitted:
            raise _limited(key, charges, values, reset_s, headers)
        return Admission(key.id, window, num_tokens_charged, headers)

    def settle(self, admission: Admission, num_tokens_used: int) -> None:
        """Correct the admission's token charge to `num_tokens_used`. Never waits: it may be called as a
        request is being cancelled."""
        if admission.num_tokens_charged is None:
            return
        window = math.floor(self.clock() / WINDOW_S)
        difference = num_tokens_used - admission.num_tokens_charged
        if window != admission.window:  # the admission window is over: only an excess still counts
            difference = max(difference, 0)
        if difference:
            name = _counter_name(admission.key_id, "tokens", window)
            task = asyncio.get_running_loop().create_task(self._add(name, difference))
            self._corrections.add(task)
            task.add_done_callback(self._corrections.discard)

    async def drain(self) -> None:
        """Wait for the corrections under way."""
        while self._corrections:
            await asyncio.wait(set(self._corrections))

    async def close(self) -> None:
        await self.drain()
        await self.counters.close()

    async def _add(self, name: str, amount: int) -> None:
        try:
            await self.counters.add(name, amount, COUNTER_TTL_S)
        except CountersUnavailable as error:
            log.warning("a token count was not corrected: the counters are unavailable (%s)", error)

    async def _check_budget(self, key: ActiveKey, num_prompt_tokens: int, now: float) -> None:
        if self.sessions is None:
            return
        start, end = budget_period(key.limits.budget_period, now)
        try:
            num_spent = await asyncio.to_thread(self._count_spent, key.id, start)
        except SQLAlchemyError as error:
            log.warning("token budget not enforced: usage cannot be read (%s)", error)
            return
        budget = key.limits.token_budget
        if num_spent + num_prompt_tokens > budget:
            retry_s = max(1, math.ceil((end - datetime.fromtimestamp(now, timezone.utc)).total_seconds()))
            raise APIError(429, f"You exceeded the token budget of key msk-{key.prefix}…: {budget} tokens per "
                                f"{key.limits.budget_period}, {num_spent} spent. It renews in {_duration(retry_s)}.",
                           type="insufficient_quota", code="insufficient_quota",
                           headers={"Retry-After": str(retry_s)})

    def _count_spent(self, key_id: int, since: datetime) -> int:
        with self.sessions() as session:
            return crud.count_key_tokens(session, key_id, since)


def budget_period(period: str, now: float) -> tuple[datetime, datetime]:
    """The UTC day or calendar month that contains `now`: its start and its end."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start, datetime.fromtimestamp(start.timestamp() + 86400, timezone.utc)
    start = start.replace(day=1)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def _counter_name(key_id: int, kind: str, window: int) -> str:
    return f"{key_id}:{kind}:{window}"


def _kind(charge: Charge) -> str:
    return charge.name.split(":")[1]  # "requests" or "tokens"


def _headers(charges: Sequence[Charge], values: Sequence[int], reset_s: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* trio for each limit the key has."""
    headers = {}
    for charge, value in zip(charges, values):
        kind = _kind(charge)
        headers[f"x-ratelimit-limit-{kind}"] = str(charge.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, charge.limit - value))
        headers[f"x-ratelimit-reset-{kind}"] = _duration(reset_s)
    return headers


def _limited(key: ActiveKey, charges: Sequence[Charge], values: Sequence[int], reset_s: float,
             headers: dict[str, str]) -> APIError:
    charge, value = next((charge, value) for charge, value in zip(charges, values)
                         if value + charge.amount > charge.limit)
    kind = _kind(charge)
    unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    retry_s = max(1, math.ceil(reset_s))
    return APIError(429, f"Rate limit reached for {unit} on key msk-{key.prefix}…: Limit {charge.limit}, Used "
                         f"{value}, Requested {charge.amount}. Please try again in {_duration(reset_s)}.",
                    type=kind, code="rate_limit_exceeded", headers={**headers, "Retry-After": str(retry_s)})


def _duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: "850ms", "12s", "1m30s", "5h0m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
