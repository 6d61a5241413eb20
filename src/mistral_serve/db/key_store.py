"""KeyStore: from a raw API key to the enabled key it names, checked against the database every time."""

from __future__ import annotations

from dataclasses import dataclass
import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mistral_serve.db import crud, plans
from mistral_serve.db.crud import KeyLimits
from mistral_serve.db.plans import PlanLimits
from mistral_serve.security import hash_api_key


log = logging.getLogger(__name__)

MAX_REMEMBERED_KEYS = 100_000  # keys accepted recently, kept for a database outage


class KeyRefused(Exception):
    """The key cannot be used; the message says why, without repeating the key."""


class KeyStoreUnavailable(Exception):
    """The database did not answer: no key can be checked now."""


@dataclass(frozen=True)
class ActiveKey:
    """An enabled key of an enabled account, as requests see it: no hash, no ORM object."""

    id: int
    account_id: int
    name: str
    prefix: str
    limits: KeyLimits  # the owner's
    ceiling: KeyLimits = KeyLimits()  # the operator's on this key
    plan: PlanLimits = PlanLimits()  # the account's (its own, or the default plan), for all its keys together
    plan_name: str | None = None

    @property
    def plan_label(self) -> str:
        """How a refusal names the plan: "your account's plan (free)"."""
        return "your account's plan" + (f" ({self.plan_name})" if self.plan_name else "")

    @property
    def requests_per_minute(self) -> int | None:
        """The key's own limit: the tighter of its owner's and its ceiling."""
        return _tighter(self.limits.requests_per_minute, self.ceiling.requests_per_minute)

    @property
    def tokens_per_minute(self) -> int | None:
        return _tighter(self.limits.tokens_per_minute, self.ceiling.tokens_per_minute)

    def budgets(self) -> list[tuple[int, str]]:
        """The key's own token budgets, the owner's and the ceiling's: (tokens, "day" or "month")."""
        return [(limits.token_budget, limits.budget_period) for limits in (self.limits, self.ceiling)
                if limits.token_budget is not None]


def _tighter(first: int | None, second: int | None) -> int | None:
    return second if first is None else first if second is None else min(first, second)


class KeyStore:
    """Every request's key is checked against the database: a disabled or deleted key is refused on
    its next request, in every process that shares the database. One indexed read per request, and
    at most one write per key per minute.

    While the database cannot be reached, a key that was accepted within `outage_grace_s` is
    accepted again (from memory, by the key's hash), so that an outage of the database does not stop
    serving; other keys get KeyStoreUnavailable."""

    def __init__(self, sessions: sessionmaker[Session], outage_grace_s: float = 0.0, clock=time.monotonic):
        self.sessions = sessions
        self.outage_grace_s = outage_grace_s
        self.clock = clock
        self._accepted: dict[str, tuple[float, ActiveKey]] = {}  # key hash → (when, the key), oldest first
        self._lock = threading.Lock()  # requests check keys in worker threads

    def authenticate(self, raw_key: str) -> ActiveKey:
        key_hash = hash_api_key(raw_key)
        with self.sessions() as session:
            try:
                key = crud.find_key_by_raw(session, raw_key)
            except SQLAlchemyError as error:
                return self._accepted_during_outage(key_hash, error)
            if key is None:
                self._forget(key_hash)
                raise KeyRefused("Incorrect API key provided. You can create a key with "
                                 "`mistral-serve keys create` and list yours with `mistral-serve keys list`.")
            if not key.is_enabled or not key.account.is_enabled:
                self._forget(key_hash)
                raise KeyRefused(_refusal(key))
            try:
                plan = plans.account_plan(session, key.account)
            except SQLAlchemyError as error:
                return self._accepted_during_outage(key_hash, error)
            active = ActiveKey(key.id, key.account_id, key.name, key.prefix, KeyLimits.of(key),
                               KeyLimits.ceiling_of(key), PlanLimits.of(plan), plan.name if plan else None)
            self._remember(key_hash, active)
            try:
                crud.touch_key_last_used(session, key.id)
            except SQLAlchemyError as error:  # a busy database must not refuse a valid key
                log.warning("cannot record the last use of key %d: %s", key.id, error)
        return active

    def _remember(self, key_hash: str, active: ActiveKey) -> None:
        if self.outage_grace_s <= 0:
            return
        with self._lock:
            self._accepted.pop(key_hash, None)  # re-inserted last: the dict stays oldest first
            self._accepted[key_hash] = (self.clock(), active)
            while len(self._accepted) > MAX_REMEMBERED_KEYS:
                del self._accepted[next(iter(self._accepted))]

    def forget(self, *, key_id: int | None = None, account_id: int | None = None) -> None:
        """The key (or every key of the account) changed here: check it again on its next request."""
        with self._lock:
            self._accepted = {key_hash: (when, key) for key_hash, (when, key) in self._accepted.items()
                              if key.id != key_id and key.account_id != account_id}

    def _forget(self, key_hash: str) -> None:
        with self._lock:
            self._accepted.pop(key_hash, None)

    def _accepted_during_outage(self, key_hash: str, error: SQLAlchemyError) -> ActiveKey:
        remembered = self._accepted.get(key_hash)
        if remembered is not None and self.clock() - remembered[0] <= self.outage_grace_s:
            log.warning("cannot read API keys (%s); accepting key %d, checked %.0f s ago", error,
                        remembered[1].id, self.clock() - remembered[0])
            return remembered[1]
        log.error("cannot read API keys: %s", error)
        raise KeyStoreUnavailable("The key store is unavailable; try again shortly.") from None


def _refusal(key) -> str:
    """Why a disabled key, or a key of a disabled account, is refused: the operator's reason if any."""
    if not key.account.is_enabled:
        reason = key.account.disabled_reason
        return "The account this API key belongs to is disabled" + (f": {reason}." if reason else ".")
    if key.is_operator_disabled:
        reason = key.disabled_reason
        return (f"The API key msk-{key.prefix}… was disabled by the operator" + (f": {reason}" if reason else "")
                + ". Only the operator can enable it again.")
    return f"The API key msk-{key.prefix}… is disabled; enable it to use it again."
