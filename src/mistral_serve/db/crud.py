"""Reads and writes of accounts, API keys and usage. With plans.py and invites.py, the only modules that
commit: callers pass a Session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
import hmac

from sqlalchemy import Date, case, cast, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from mistral_serve.db.models import BUDGET_PERIODS, USAGE_STATUSES, Account, ApiKey, LoginSession, Usage, utcnow
from mistral_serve.security import (api_key_prefix, generate_api_key, generate_token, hash_api_key, hash_password,
                                    hash_session_token)

MAX_EMAIL_CHARS = 254
MAX_KEY_NAME_CHARS = 100
MAX_LIMITS = {"requests_per_minute": 2**31 - 1, "tokens_per_minute": 2**31 - 1, "token_budget": 2**63 - 1}  # the columns'


class AlreadyExists(ValueError):
    pass


@dataclass(frozen=True)
class KeyLimits:
    """A key's optional limits; None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    budget_period: str | None = None  # "day" or "month": the window of token_budget

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "token_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_LIMITS[name]):
                raise ValueError(f"{name} must be a whole number from 1 to {MAX_LIMITS[name]}, got {value!r}")
        if self.budget_period is not None and self.budget_period not in BUDGET_PERIODS:
            raise ValueError(f"budget_period must be 'day' or 'month', got {self.budget_period!r}")
        if (self.token_budget is None) != (self.budget_period is None):
            raise ValueError("a token budget needs a period ('day' or 'month'), and a period needs a budget")

    @classmethod
    def of(cls, key: ApiKey) -> KeyLimits:
        """The limits the key's owner set."""
        return cls(key.requests_per_minute, key.tokens_per_minute, key.token_budget, key.budget_period)

    @classmethod
    def ceiling_of(cls, key: ApiKey) -> KeyLimits:
        """The operator's ceiling on the key."""
        return cls(key.ceiling_requests_per_minute, key.ceiling_tokens_per_minute, key.ceiling_token_budget,
                   key.ceiling_budget_period)

    def above(self, ceiling: KeyLimits) -> str | None:
        """The first of these limits that `ceiling` does not allow (higher, or none where the ceiling has
        one, or a budget of another period or above it); None if they all fit."""
        for name in ("requests_per_minute", "tokens_per_minute"):
            limit, value = getattr(ceiling, name), getattr(self, name)
            if limit is not None and (value is None or value > limit):
                return f"{name} {'unlimited' if value is None else value} is above the ceiling of {limit}"
        if ceiling.token_budget is not None and (
                self.token_budget is None or self.budget_period != ceiling.budget_period
                or self.token_budget > ceiling.token_budget):
            shown = "none" if self.token_budget is None else f"{self.token_budget} per {self.budget_period}"
            return (f"token_budget {shown} is above the ceiling of {ceiling.token_budget} per "
                    f"{ceiling.budget_period}")
        return None

    @property
    def is_unlimited(self) -> bool:
        return self == KeyLimits()


def normalize_email(email: str) -> str:
    """One spelling per address: surrounding space dropped, all of it in lower case (local parts that
    differ only in case are one mailbox everywhere in practice). Raise ValueError if it is none."""
    normalized = email.strip().lower()
    local, at, domain = normalized.rpartition("@")
    if (not at or not local or "." not in domain.strip(".") or len(normalized) > MAX_EMAIL_CHARS
            or any(char.isspace() or is_control(char) for char in normalized)):
        raise ValueError(f"not an email address: {email!r}")
    return normalized


# accounts

def create_account(session: Session, email: str, password: str | None, *, is_admin: bool = False,
                   is_self_registered: bool = False, plan_id: int | None = None, commit: bool = True) -> Account:
    """A new enabled account. `password=None` makes one that cannot log in with a password;
    `is_self_registered`: made by sign-up, not by an operator. `commit=False`: flushed only, for a
    caller's transaction."""
    account = Account(email=normalize_email(email),
                      password_hash=None if password is None else hash_password(password), is_admin=is_admin,
                      is_self_registered=is_self_registered, plan_id=plan_id)
    session.add(account)
    try:
        session.commit() if commit else session.flush()
    except IntegrityError:
        session.rollback()
        raise AlreadyExists(f"an account with the email {account.email} exists already") from None
    return account


def get_account(session: Session, account_id: int) -> Account | None:
    return session.get(Account, account_id)


def get_account_by_email(session: Session, email: str) -> Account | None:
    try:
        email = normalize_email(email)
    except ValueError:
        return None
    return session.scalar(select(Account).where(Account.email == email))


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).options(joinedload(Account.api_keys)).order_by(Account.id)).unique())


def set_account_enabled(session: Session, account: Account, is_enabled: bool, reason: str | None = None) -> Account:
    """An operator's act: a disabled account's keys and logins are refused; `reason` is shown to its owner."""
    account.is_enabled = is_enabled
    account.disabled_reason = None if is_enabled else _reason(reason)
    session.commit()
    return account


def set_account_admin(session: Session, account: Account, is_admin: bool) -> Account:
    account.is_admin = is_admin
    session.commit()
    return account


MAX_REASON_CHARS = 200


def _reason(reason: str | None) -> str | None:
    if reason is None or not reason.strip():
        return None
    reason = reason.strip()
    if len(reason) > MAX_REASON_CHARS or any(is_control(char) for char in reason):
        raise ValueError(f"a reason has at most {MAX_REASON_CHARS} characters, no control characters")
    return reason


def set_password(session: Session, account: Account, password: str) -> Account:
    """Store a new hash of `password` (raises ValueError if it is too weak): a change, or a rehash."""
    account.password_hash = hash_password(password)
    session.commit()
    return account


def delete_account(session: Session, account: Account) -> None:
    """The account goes, and with it its keys and sessions (ON DELETE CASCADE): its keys are refused from the
    next request on. Its usage rows stay, without the link."""
    session.execute(delete(Account).where(Account.id == account.id))
    session.commit()


# sessions (web dashboard logins)

def create_login_session(session: Session, account: Account, lifetime: timedelta) -> str:
    """A new session of `account` that expires after `lifetime` unless used: its raw token, returned once."""
    token = generate_token()
    now = utcnow()
    session.add(LoginSession(token_hash=hash_session_token(token), account_id=account.id, created_at=now,
                             expires_at=now + lifetime))
    session.execute(delete(LoginSession).where(LoginSession.expires_at <= now))  # whoever logs in sweeps
    session.commit()
    return token


def find_login_session(session: Session, token: str, lifetime: timedelta,
                       min_interval: timedelta = timedelta(minutes=1)) -> LoginSession | None:
    """The unexpired session whose token is `token`, with its account; its expiry slides to now +
    `lifetime`, written at most once per `min_interval`. None if there is no such session."""
    now = utcnow()
    login = session.scalar(select(LoginSession).options(joinedload(LoginSession.account))
                           .where(LoginSession.token_hash == hash_session_token(token)))
    if login is None or login.expires_at <= now:
        return None
    if login.expires_at - lifetime <= now - min_interval:
        login.expires_at = now + lifetime
        session.commit()
    return login


def delete_login_session(session: Session, token: str) -> None:
    session.execute(delete(LoginSession).where(LoginSession.token_hash == hash_session_token(token)))
    session.commit()


def delete_other_login_sessions(session: Session, account: Account, keep_token: str | None) -> int:
    """End every session of `account` but the one of `keep_token`: how many ended."""
    query = delete(LoginSession).where(LoginSession.account_id == account.id)
    if keep_token is not None:
        query = query.where(LoginSession.token_hash != hash_session_token(keep_token))
    result = session.execute(query)
    session.commit()
    return result.rowcount


# API keys

def create_api_key(session: Session, account: Account, name: str, limits: KeyLimits = KeyLimits(),
                   ceiling: KeyLimits = KeyLimits()) -> tuple[ApiKey, str]:
    """A new enabled key for `account`, and its raw secret: returned once, stored only as a hash.
    `limits`: its owner's; `ceiling`: the operator's, which the owner cannot lift."""
    raw_key = generate_api_key()
    key = ApiKey(account_id=account.id, name=_key_name(name), prefix=api_key_prefix(raw_key),
                 key_hash=hash_api_key(raw_key))
    _set_limits(key, limits)
    _set_ceiling(key, ceiling)
    session.add(key)
    session.commit()
    return key, raw_key


def _set_limits(key: ApiKey, limits: KeyLimits) -> None:
    key.requests_per_minute, key.tokens_per_minute = limits.requests_per_minute, limits.tokens_per_minute
    key.token_budget, key.budget_period = limits.token_budget, limits.budget_period


def _set_ceiling(key: ApiKey, ceiling: KeyLimits) -> None:
    key.ceiling_requests_per_minute, key.ceiling_tokens_per_minute = (ceiling.requests_per_minute,
                                                                      ceiling.tokens_per_minute)
    key.ceiling_token_budget, key.ceiling_budget_period = ceiling.token_budget, ceiling.budget_period


def count_account_keys(session: Session, account: Account) -> int:
    return session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.account_id == account.id))


def _key_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_KEY_NAME_CHARS:
        raise ValueError(f"a key name has 1 to {MAX_KEY_NAME_CHARS} characters")
    if any(is_control(char) for char in name):
        raise ValueError("a key name has no control characters")
    return name


def is_control(char: str) -> bool:
    return char < " " or "\x7f" <= char <= "\x9f"  # PostgreSQL cannot store NUL; none belongs in a name


def find_key_by_raw(session: Session, raw_key: str) -> ApiKey | None:
    """The key whose hash is that of `raw_key`, with its account; None if there is none."""
    key_hash = hash_api_key(raw_key)
    key = session.scalar(select(ApiKey).options(joinedload(ApiKey.account).joinedload(Account.plan))
                         .where(ApiKey.key_hash == key_hash))
    if key is None or not hmac.compare_digest(key.key_hash, key_hash):
        return None
    return key


def get_key(session: Session, key_id: int) -> ApiKey | None:
    return session.get(ApiKey, key_id, options=[joinedload(ApiKey.account)])


def get_account_key(session: Session, account: Account, key_id: int) -> ApiKey | None:
    """`account`'s key `key_id`; None for an unknown id and for another account's key alike."""
    return session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.account_id == account.id))


class OperatorDecision(PermissionError):
    """The owner tried to undo what an operator decided about a key."""


def update_key(session: Session, key: ApiKey, *, name: str | None = None, is_enabled: bool | None = None,
               limits: KeyLimits | None = None) -> ApiKey:
    """The owner renames, enables or disables `key`, or replaces all its limits; what is None stays as
    it is. OperatorDecision when enabling a key the operator disabled; ValueError for limits above the
    key's ceiling (the plan's are the caller's to check)."""
    if is_enabled and key.is_operator_disabled:
        raise OperatorDecision(f"The key msk-{key.prefix}… was disabled by the operator"
                               + (f": {key.disabled_reason}" if key.disabled_reason else "")
                               + ". Only the operator can enable it again.")
    if limits is not None:
        above = limits.above(KeyLimits.ceiling_of(key))
        if above is not None:
            raise ValueError(f"{above} the operator set on this key")
    if name is not None:
        key.name = _key_name(name)
    if is_enabled is not None:
        key.is_enabled = is_enabled
    if limits is not None:
        _set_limits(key, limits)
    session.commit()
    return key


def set_key_ceiling(session: Session, key: ApiKey, ceiling: KeyLimits) -> ApiKey:
    """The operator's ceiling on `key`; the owner's limits stay, and the tighter of the two applies."""
    _set_ceiling(key, ceiling)
    session.commit()
    return key


def find_keys_by_prefix(session: Session, prefix: str) -> list[ApiKey]:
    """Keys whose shown prefix is `prefix` (with or without "msk-"): usually one, rarely several."""
    prefix = prefix.strip().removeprefix("msk-").rstrip("…")
    return list(session.scalars(select(ApiKey).options(joinedload(ApiKey.account))
                                .where(ApiKey.prefix == prefix).order_by(ApiKey.id)))


def list_keys(session: Session, account: Account | None = None) -> list[ApiKey]:
    """Every key, or `account`'s, oldest first."""
    query = select(ApiKey).options(joinedload(ApiKey.account)).order_by(ApiKey.id)
    if account is not None:
        query = query.where(ApiKey.account_id == account.id)
    return list(session.scalars(query))


def set_key_enabled_by_operator(session: Session, key: ApiKey, is_enabled: bool, reason: str | None = None) -> ApiKey:
    """An operator disables a key (its owner cannot enable it again; `reason` is shown to the owner) or
    enables it."""
    key.is_enabled = is_enabled
    key.is_operator_disabled = not is_enabled
    key.disabled_reason = None if is_enabled else _reason(reason)
    session.commit()
    return key


def delete_key(session: Session, key: ApiKey) -> None:
    session.delete(key)
    session.commit()


def touch_key_last_used(session: Session, key_id: int, now: datetime | None = None,
                        min_interval: timedelta = timedelta(minutes=1)) -> bool:
    """Set the key's last use to `now`, unless it was set less than `min_interval` ago: at most one
    write per key per interval, whichever process serves it. True if it wrote."""
    now = now or utcnow()
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - min_interval))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount == 1


# usage

@dataclass(frozen=True)
class UsageRecord:
    """One chat request's usage, as the API layer reports it; a `usage` row once written."""

    request_id: str
    key_id: int | None
    account_id: int | None
    model: str
    status: str  # one of USAGE_STATUSES
    http_status: int
    duration_ms: int
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    time_to_first_token_ms: int | None = None
    created_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        if self.status not in USAGE_STATUSES:
            raise ValueError(f"usage status must be one of {', '.join(USAGE_STATUSES)}, got {self.status!r}")


def record_usage_batch(session: Session, records: Sequence[UsageRecord]) -> int:
    """Insert `records` in one statement and one transaction: all of them or none. A row whose request
    id is already there is skipped (a spooled batch written twice adds nothing); a row whose key or
    account was deleted meanwhile is kept, without the link. Returns the number of rows inserted."""
    rows = list({record.request_id: asdict(record) for record in records}.values())
    if rows:
        existing = set(session.scalars(select(Usage.request_id).where(
            Usage.request_id.in_([row["request_id"] for row in rows]))))
        rows = [row for row in rows if row["request_id"] not in existing]
    if not rows:
        return 0
    key_ids = set(session.scalars(select(ApiKey.id).where(ApiKey.id.in_({row["key_id"] for row in rows}))))
    account_ids = set(session.scalars(select(Account.id).where(
        Account.id.in_({row["account_id"] for row in rows}))))
    for row in rows:
        row["key_id"] = row["key_id"] if row["key_id"] in key_ids else None
        row["account_id"] = row["account_id"] if row["account_id"] in account_ids else None
    session.execute(insert(Usage), rows)
    session.commit()
    return len(rows)


def count_key_tokens(session: Session, key_id: int, since: datetime) -> int:
    """Prompt and completion tokens of `key_id`'s requests since `since`: what its budget has spent."""
    return session.scalar(select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0))
                          .where(Usage.key_id == key_id, Usage.created_at >= since))


def count_account_tokens(session: Session, account_id: int, since: datetime) -> int:
    """Prompt and completion tokens of `account_id`'s requests since `since`, all keys together."""
    return session.scalar(select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0))
                          .where(Usage.account_id == account_id, Usage.created_at >= since))


USAGE_GROUPS = ("account", "key", "model", "day")


@dataclass(frozen=True)
class UsageTotal:
    """The sums over one group of usage rows; a field the rows were not grouped by is None."""

    account_id: int | None  # None too when the account was deleted
    key_id: int | None
    key_name: str | None  # None too when the key was deleted
    model: str | None
    day: date | None  # UTC
    num_requests: int
    num_failed_requests: int  # error, limited or aborted
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_totals(session: Session, *, account_id: int | None = None, since: datetime | None = None,
                 until: datetime | None = None, by: Sequence[str] = ("key", "model")) -> list[UsageTotal]:
    """Totals of the usage rows of `account_id` (or of all) created in [since, until), grouped by any of
    "account", "key", "model" and "day" (UTC), ordered by those groups."""
    unknown = set(by) - set(USAGE_GROUPS)
    if unknown:
        raise ValueError(f"usage can be grouped by {', '.join(USAGE_GROUPS)}, not {', '.join(sorted(unknown))}")
    account_columns = [Usage.account_id] if "account" in by else []
    key_columns = [Usage.key_id, ApiKey.name] if "key" in by else []
    model_columns = [Usage.model] if "model" in by else []
    day_columns = [_utc_day(session)] if "day" in by else []
    columns = account_columns + key_columns + model_columns + day_columns
    is_failed = case((Usage.status == "ok", 0), else_=1)
    query = (select(*columns, func.count(), func.sum(is_failed), func.sum(Usage.prompt_tokens),
                    func.sum(Usage.cached_prompt_tokens), func.sum(Usage.completion_tokens))
             .select_from(Usage).outerjoin(ApiKey, ApiKey.id == Usage.key_id))
    if account_id is not None:
        query = query.where(Usage.account_id == account_id)
    if since is not None:
        query = query.where(Usage.created_at >= since)
    if until is not None:
        query = query.where(Usage.created_at < until)
    if columns:
        query = query.group_by(*columns).order_by(*columns)
    totals = []
    for row in session.execute(query):
        groups = iter(row[:len(columns)])
        group_account_id = next(groups) if account_columns else None
        key_id, key_name = (next(groups), next(groups)) if key_columns else (None, None)
        model = next(groups) if model_columns else None
        day = _as_date(next(groups)) if day_columns else None
        sums = [int(value or 0) for value in row[len(columns):]]
        totals.append(UsageTotal(group_account_id, key_id, key_name, model, day, *sums))
    return totals


def _utc_day(session: Session):
    """The UTC calendar day of a usage row, on either backend."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.timezone("UTC", Usage.created_at), Date)
    return func.date(Usage.created_at)  # SQLite keeps the UTC time as text: its date part


def _as_date(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


def list_usage(session: Session, account_id: int, *, since: datetime | None = None, until: datetime | None = None,
               limit: int = 100) -> list[Usage]:
    """`account_id`'s usage rows in [since, until), newest first, at most `limit`."""
    query = select(Usage).where(Usage.account_id == account_id)
    if since is not None:
        query = query.where(Usage.created_at >= since)
    if until is not None:
        query = query.where(Usage.created_at < until)
    return list(session.scalars(query.order_by(Usage.created_at.desc(), Usage.id.desc()).limit(limit)))
