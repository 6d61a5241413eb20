"""The rate limits and token budgets, checked in two steps as a chat request is admitted.

Whose limits: a key's own (the tighter of its owner's limits and the operator's ceiling on it) and
its account's plan (all the account's keys together). Every one of them must hold.

1. `admit`, before any work on the request: the request is counted against requests per minute,
   and refused if a tokens-per-minute window or a budget has nothing left. A request refused later
   for its content has been counted.
2. `reserve`, once the prompt is tokenized: the request is charged its prompt plus the most it may
   generate (n × max_tokens) against tokens per minute and against every budget. If that cannot fit
   a limit, the request is refused when the client gave max_tokens, and its max_tokens is lowered to
   what fits when it did not. What was charged is settled when the request ends (`settle`).

Windows: requests and tokens per minute are counted in fixed one-minute windows aligned to the
clock (the window of time t is floor(t / 60)), so every replica names the same window and, with
Redis, adds to the same count. A fixed window can let a key through at up to twice its rate across a
window boundary; in exchange a count is one integer per window and the reset headers are exact.
When a request ends, its token charge is corrected to the tokens it used: the difference goes back
to (or is added to) the admission window while it is current; once a newer window has begun, only
tokens beyond the charge are added, to the current window.

Budgets (per UTC day or calendar month): spent is the sum of the usage rows in the period; the
requests in flight hold reservations in a counter beside it. A reservation is lowered to the tokens
used when its request ends, and dropped `RESERVATION_HOLD_S` later, once the usage row is written.

If Redis or the database cannot be reached, requests are let through and a warning is logged: an
outage of the limiter does not stop serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
import logging
import math
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve.api.counters import Charge, Clock, Counters, CountersUnavailable
from mistral_serve.api.errors import APIError
from mistral_serve.db import crud
from mistral_serve.db.key_store import ActiveKey

log = logging.getLogger(__name__)

WINDOW_S = 60
COUNTER_TTL_S = 2 * WINDOW_S  # a window's counters outlive it a little, then expire
RESERVATION_HOLD_S = 10.0  # a finished request's tokens stay reserved until its usage row is surely written
QUOTA_RETRY_AFTER_S = 5  # a budget held by requests in flight frees up as they end


@dataclass(frozen=True)
class Budget:
    """A token budget of a key or an account over one period, with what its usage rows have spent."""

    scope: str  # "key" or "account"
    owner_id: int
    limit: int
    period: str  # "day" or "month"
    start: datetime
    end: datetime
    num_spent: int

    @property
    def counter(self) -> str:
        """The counter of the tokens its requests in flight have reserved."""
        return f"{self.scope}:{self.owner_id}:reserved:{self.period}:{int(self.start.timestamp())}"

    @property
    def num_left(self) -> int:
        return self.limit - self.num_spent


@dataclass(frozen=True)
class _Limit:
    """One counter a request is charged to, and what to tell the client when it is full."""

    kind: str  # "requests", "tokens" or "budget"
    scope: str  # "key" or "account"
    counter: str
    limit: int
    budget: Budget | None = None


@dataclass
class Admission:
    """A request let through `admit`: its limits, its charges so far, and the headers that tell the
    client where it stands."""

    key: ActiveKey
    window: int
    headers: dict[str, str]
    token_limits: list[_Limit]  # what `reserve` charges: tokens per minute (key, account) and every budget
    seen: dict[str, int] = field(default_factory=dict)  # the counters as `admit` saw them
    num_tokens_reserved: int = 0  # charged to every token limit and budget by `reserve`
    is_enforced: bool = True  # False: the counters were unavailable, nothing was charged
    _charged: list[_Limit] = field(default_factory=list)

    @property
    def budgets(self) -> list[Budget]:
        return [limit.budget for limit in self.token_limits if limit.budget is not None]


class RateLimiter:
    """Admits requests within their key's and account's limits (429 otherwise) and settles what they used."""

    def __init__(self, counters: Counters, sessions: sessionmaker[Session] | None = None, clock: Clock = time.time,
                 reservation_hold_s: float = RESERVATION_HOLD_S):
        self.counters = counters
        self.sessions = sessions  # where usage rows are summed for budgets; None: budgets unchecked
        self.clock = clock
        self.reservation_hold_s = reservation_hold_s
        self._corrections: set[asyncio.Task] = set()
        self._held: dict[asyncio.Task, tuple[str, int, int]] = {}  # delayed corrections: counter, amount, ttl

    # step 1: before any work

    async def admit(self, key: ActiveKey) -> Admission:
        """Count one request of `key` against requests per minute; a 429 APIError if that, a full
        tokens-per-minute window or a spent budget refuses it."""
        now = self.clock()
        window = math.floor(now / WINDOW_S)
        budgets = await self._budgets(key, now)
        for budget in budgets:
            if budget.num_left <= 0:
                raise _over_budget(key, budget, now)
        token_limits = [_Limit("tokens", scope, f"{scope}:{owner}:tokens:{window}", limit)
                        for scope, owner, limit in (("key", key.id, key.tokens_per_minute),
                                                    ("account", key.account_id, key.plan.tokens_per_minute))
                        if limit is not None]
        request_limits = [_Limit("requests", scope, f"{scope}:{owner}:requests:{window}", limit)
                          for scope, owner, limit in (("key", key.id, key.requests_per_minute),
                                                      ("account", key.account_id, key.plan.requests_per_minute))
                          if limit is not None]
        budget_limits = [_Limit("budget", budget.scope, budget.counter, budget.num_left, budget)
                         for budget in budgets]
        # requests are counted; token windows and budgets only need one token left (a charge of 0 within limit - 1)
        charges = ([Charge(limit.counter, 1, limit.limit) for limit in request_limits]
                   + [Charge(limit.counter, 0, limit.limit - 1) for limit in token_limits + budget_limits])
        admission = Admission(key, window, {}, token_limits + budget_limits)
        if not charges:
            return admission
        try:
            is_admitted, values = await self.counters.charge(charges, self._ttl(budgets, now))
        except CountersUnavailable as error:
            log.warning("rate limits not enforced: the counters are unavailable (%s)", error)
            admission.is_enforced = False
            return admission
        limits = request_limits + token_limits + budget_limits
        admission.seen = {charge.name: value for charge, value in zip(charges, values)}
        reset_s = (window + 1) * WINDOW_S - now
        admission.headers = _headers(limits, values, reset_s)
        if not is_admitted:
            charge, limit, value = _first_refused(charges, limits, values)
            if limit.kind == "budget":
                raise _budget_held(key, limit.budget)
            raise _limited(key, limit, value, charge.amount or 1, reset_s, admission.headers)
        return admission

    # step 2: once the prompt is tokenized

    async def reserve(self, admission: Admission, num_prompt_tokens: int, n: int, max_tokens: int | None,
                      default_max_tokens: int) -> int:
        """Charge the request its prompt plus n × its most tokens per choice; returns that most:
        `max_tokens` when the client gave it (a 429 if it cannot fit), else `default_max_tokens`
        lowered to what fits every limit."""
        key = admission.key
        num_per_choice = default_max_tokens if max_tokens is None else max_tokens
        if not admission.is_enforced:
            return num_per_choice
        limits = admission.token_limits  # each limit: its tokens per minute, or what is left of its budget
        for limit in limits:
            if num_prompt_tokens + n * (max_tokens or 1) > limit.limit:  # whenever it came, it could not fit
                raise _too_large(key, limit, num_prompt_tokens, n, max_tokens)
            if max_tokens is None:  # lowered to what was left at admission; the charge below decides
                num_fitting = (limit.limit - admission.seen.get(limit.counter, 0) - num_prompt_tokens) // n
                num_per_choice = max(1, min(num_per_choice, num_fitting))
        amount = num_prompt_tokens + n * num_per_choice
        charges = [Charge(limit.counter, amount, limit.limit) for limit in limits]
        if not charges:
            return num_per_choice
        now = self.clock()
        try:
            is_admitted, values = await self.counters.charge(charges, self._ttl(admission.budgets, now))
        except CountersUnavailable as error:
            log.warning("token limits not enforced: the counters are unavailable (%s)", error)
            return num_per_choice
        reset_s = (admission.window + 1) * WINDOW_S - now
        admission.headers.update(_headers(limits, values, reset_s))
        if not is_admitted:
            charge, limit, value = _first_refused(charges, limits, values)
            if limit.kind == "budget":
                raise _budget_held(key, limit.budget)
            raise _limited(key, limit, value, amount, reset_s, admission.headers)
        admission.num_tokens_reserved = amount
        admission._charged = limits
        return num_per_choice

    def settle(self, admission: Admission, num_tokens_used: int) -> None:
        """Correct the admission's charges to `num_tokens_used`. Never waits: it may be called as a
        request is being cancelled."""
        if not admission._charged:
            return
        window = math.floor(self.clock() / WINDOW_S)
        difference = num_tokens_used - admission.num_tokens_reserved
        for limit in admission._charged:
            if limit.kind == "tokens":
                if window != admission.window:  # the admission window is over: only an excess still counts
                    name = limit.counter.rsplit(":", 1)[0] + f":{window}"
                    self._correct(name, max(difference, 0), COUNTER_TTL_S)
                else:
                    self._correct(limit.counter, difference, COUNTER_TTL_S)
            else:  # a budget: down to what was used now, to nothing once the usage row counts it
                ttl_s = self._ttl([limit.budget], self.clock())
                self._correct(limit.counter, difference, ttl_s)
                self._correct(limit.counter, -num_tokens_used, ttl_s, delay_s=self.reservation_hold_s)

    async def drain(self) -> None:
        """Wait for the corrections under way (not those held back for their usage rows)."""
        while self._corrections:
            await asyncio.wait(set(self._corrections))

    async def close(self) -> None:
        """Apply every correction now, held ones included (a stopping server does not wait them out)."""
        held = list(self._held.items())
        self._held.clear()
        for task, (name, amount, ttl_s) in held:
            task.cancel()
            await self._add(name, amount, ttl_s, 0.0)
        await self.drain()
        await self.counters.close()

    def _correct(self, name: str, amount: int, ttl_s: int, delay_s: float = 0.0) -> None:
        if not amount:
            return
        task = asyncio.get_running_loop().create_task(self._add(name, amount, ttl_s, delay_s))
        if delay_s:
            self._held[task] = (name, amount, ttl_s)
            task.add_done_callback(lambda done: self._held.pop(done, None))
        else:
            self._corrections.add(task)
            task.add_done_callback(self._corrections.discard)

    async def _add(self, name: str, amount: int, ttl_s: int, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            await self.counters.add(name, amount, ttl_s)
        except CountersUnavailable as error:
            log.warning("a token count was not corrected: the counters are unavailable (%s)", error)

    @staticmethod
    def _ttl(budgets: Sequence[Budget], now: float) -> int:
        """Counters live two windows, and a budget's reservations until its period is over."""
        return max([COUNTER_TTL_S] + [math.ceil(budget.end.timestamp() - now) + WINDOW_S for budget in budgets])

    async def _budgets(self, key: ActiveKey, now: float) -> list[Budget]:
        wanted = ([("key", key.id, limit, period) for limit, period in key.budgets()]
                  + [("account", key.account_id, limit, period) for limit, period in key.plan.budgets()])
        if not wanted or self.sessions is None:
            return []
        try:
            return await asyncio.to_thread(self._read_budgets, wanted, now)
        except SQLAlchemyError as error:
            log.warning("token budgets not enforced: usage cannot be read (%s)", error)
            return []

    def _read_budgets(self, wanted: list[tuple[str, int, int, str]], now: float) -> list[Budget]:
        budgets, spent = [], {}
        with self.sessions() as session:
            for scope, owner_id, limit, period in wanted:
                start, end = budget_period(period, now)
                if (scope, period) not in spent:
                    count = crud.count_key_tokens if scope == "key" else crud.count_account_tokens
                    spent[scope, period] = count(session, owner_id, start)
                budgets.append(Budget(scope, owner_id, limit, period, start, end, spent[scope, period]))
        return budgets


def budget_period(period: str, now: float) -> tuple[datetime, datetime]:
    """The UTC day or calendar month that contains `now`: its start and its end."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return start, datetime.fromtimestamp(start.timestamp() + 86400, timezone.utc)
    start = start.replace(day=1)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def _first_refused(charges: Sequence[Charge], limits: Sequence[_Limit], values: Sequence[int]):
    return next((charge, limit, value) for charge, limit, value in zip(charges, limits, values)
                if value + charge.amount > charge.limit)


def _headers(limits: Sequence[_Limit], values: Sequence[int], reset_s: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* trio for requests and for tokens, each of the tightest limit of its kind.
    `values`: the counters after a charge that went through, or as they were if it was refused."""
    headers = {}
    for kind in ("requests", "tokens"):
        remaining = [(limit.limit - value, limit) for limit, value in zip(limits, values) if limit.kind == kind]
        if remaining:
            num_left, limit = min(remaining, key=lambda item: item[0])
            headers[f"x-ratelimit-limit-{kind}"] = str(limit.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, num_left))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset_s)
    return headers


def _whose(key: ActiveKey, scope: str) -> str:
    return f"key msk-{key.prefix}…" if scope == "key" else key.plan_label


def _limited(key: ActiveKey, limit: _Limit, value: int, amount: int, reset_s: float,
             headers: dict[str, str]) -> APIError:
    unit = "requests per min (RPM)" if limit.kind == "requests" else "tokens per min (TPM)"
    retry_s = max(1, math.ceil(reset_s))
    return APIError(429, f"Rate limit reached for {unit} on {_whose(key, limit.scope)}: Limit {limit.limit}, Used "
                         f"{value}, Requested {amount}. Please try again in {_duration(reset_s)}.",
                    type=limit.kind, code="rate_limit_exceeded", headers={**headers, "Retry-After": str(retry_s)})


def _too_large(key: ActiveKey, limit: _Limit, num_prompt_tokens: int, n: int, max_tokens: int | None) -> APIError:
    """A request that could never fit a limit, whenever it came: no Retry-After."""
    if max_tokens is None:
        asked = f"its {num_prompt_tokens} prompt tokens and at least one token for each of its {n} choices"
        fix = "Shorten the messages or lower n."
    else:
        asked = f"{num_prompt_tokens} prompt tokens + {n} × max_tokens {max_tokens}"
        fix = "Lower max_tokens or n, or shorten the messages."
    if limit.kind == "budget":
        budget = limit.budget
        return APIError(429, f"This request needs {asked}, more than is left of the token budget of "
                             f"{_whose(key, limit.scope)}: {budget.num_left} of {budget.limit} per {budget.period}. "
                             f"{fix}", type="insufficient_quota", code="insufficient_quota")
    return APIError(429, f"Request too large for tokens per min (TPM) on {_whose(key, limit.scope)}: Limit "
                         f"{limit.limit}, Requested {asked}. {fix}", type="tokens", code="rate_limit_exceeded")


def _over_budget(key: ActiveKey, budget: Budget, now: float) -> APIError:
    retry_s = max(1, math.ceil((budget.end - datetime.fromtimestamp(now, timezone.utc)).total_seconds()))
    return APIError(429, f"You exceeded the token budget of {_whose(key, budget.scope)}: {budget.limit} tokens per "
                         f"{budget.period}, {budget.num_spent} spent. It renews in {_duration(retry_s)}.",
                    type="insufficient_quota", code="insufficient_quota", headers={"Retry-After": str(retry_s)})


def _budget_held(key: ActiveKey, budget: Budget) -> APIError:
    return APIError(429, f"What is left of the token budget of {_whose(key, budget.scope)} ({budget.num_left} of "
                         f"{budget.limit} per {budget.period}) is reserved by requests in flight; try again when "
                         "they end.", type="insufficient_quota", code="insufficient_quota",
                    headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)})


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
