"""Reads and writes of accounts and API keys. The only module that commits: callers pass a Session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
import hmac

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from mistral_serve.db.models import BUDGET_PERIODS, Account, ApiKey, utcnow
from mistral_serve.security import api_key_prefix, generate_api_key, hash_api_key, hash_password

MAX_EMAIL_CHARS = 254
MAX_KEY_NAME_CHARS = 100


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
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if self.budget_period is not None and self.budget_period not in BUDGET_PERIODS:
            raise ValueError(f"budget_period must be 'day' or 'month', got {self.budget_period!r}")
        if (self.token_budget is None) != (self.budget_period is None):
            raise ValueError("a token budget needs a period ('day' or 'month'), and a period needs a budget")

    @classmethod
    def of(cls, key: ApiKey) -> KeyLimits:
        return cls(key.requests_per_minute, key.tokens_per_minute, key.token_budget, key.budget_period)


def normalize_email(email: str) -> str:
    """One spelling per address: surrounding space dropped, lower case. Raise ValueError if it is none."""
    normalized = email.strip().lower()
    local, at, domain = normalized.rpartition("@")
    if (not at or not local or "." not in domain.strip(".") or len(normalized) > MAX_EMAIL_CHARS
            or any(char.isspace() for char in normalized)):
        raise ValueError(f"not an email address: {email!r}")
    return normalized


# accounts

def create_account(session: Session, email: str, password: str | None) -> Account:
    """A new enabled account. `password=None` makes one that cannot log in with a password."""
    account = Account(email=normalize_email(email),
                      password_hash=None if password is None else hash_password(password))
    session.add(account)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise AlreadyExists(f"an account with the email {account.email} exists already") from None
    return account


def get_account_by_email(session: Session, email: str) -> Account | None:
    try:
        email = normalize_email(email)
    except ValueError:
        return None
    return session.scalar(select(Account).where(Account.email == email))


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).options(joinedload(Account.api_keys)).order_by(Account.id)).unique())


def set_account_enabled(session: Session, account: Account, is_enabled: bool) -> Account:
    account.is_enabled = is_enabled
    session.commit()
    return account


# API keys

def create_api_key(session: Session, account: Account, name: str,
                   limits: KeyLimits = KeyLimits()) -> tuple[ApiKey, str]:
    """A new enabled key for `account`, and its raw secret: returned once, stored only as a hash."""
    name = name.strip()
    if not name or len(name) > MAX_KEY_NAME_CHARS:
        raise ValueError(f"a key name has 1 to {MAX_KEY_NAME_CHARS} characters")
    raw_key = generate_api_key()
    key = ApiKey(account_id=account.id, name=name, prefix=api_key_prefix(raw_key), key_hash=hash_api_key(raw_key),
                 requests_per_minute=limits.requests_per_minute, tokens_per_minute=limits.tokens_per_minute,
                 token_budget=limits.token_budget, budget_period=limits.budget_period)
    session.add(key)
    session.commit()
    return key, raw_key


def find_key_by_raw(session: Session, raw_key: str) -> ApiKey | None:
    """The key whose hash is that of `raw_key`, with its account; None if there is none."""
    key_hash = hash_api_key(raw_key)
    key = session.scalar(select(ApiKey).options(joinedload(ApiKey.account)).where(ApiKey.key_hash == key_hash))
    if key is None or not hmac.compare_digest(key.key_hash, key_hash):
        return None
    return key


def get_key(session: Session, key_id: int) -> ApiKey | None:
    return session.get(ApiKey, key_id, options=[joinedload(ApiKey.account)])


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


def set_key_enabled(session: Session, key: ApiKey, is_enabled: bool) -> ApiKey:
    key.is_enabled = is_enabled
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
