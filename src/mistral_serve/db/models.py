"""The tables, as SQLAlchemy 2 declarative models. A schema change here needs a migration in `migrations/`."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, false,
                        text, true)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# constraint names fixed here, so migrations name them the same on every backend
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
BUDGET_PERIODS = ("day", "month")
USAGE_STATUSES = ("ok", "error", "limited", "aborted")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """An aware UTC datetime on every backend (SQLite stores no time zone: it comes back naive, and is UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("a naive datetime cannot be stored: give it a time zone")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Plan(Base):
    """A ceiling the operator sets for accounts: what none of an account's keys together may pass.
    A None limit is no limit. At most one plan is the default: the plan of accounts assigned none."""

    __tablename__ = "plans"
    __table_args__ = (
        # one default plan at most: a unique index over the rows that are the default
        Index("uq_plans_default", "is_default", unique=True, sqlite_where=text("is_default"),
              postgresql_where=text("is_default")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    is_default: Mapped[bool] = mapped_column(default=False, server_default=false())
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)  # the account's, all keys together
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_requests: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)  # UTC day
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger)  # calendar month, UTC
    max_keys: Mapped[int | None] = mapped_column(Integer)
    max_n: Mapped[int | None] = mapped_column(Integer)  # choices per request
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)  # per choice and request
    models: Mapped[str | None] = mapped_column(Text)  # a JSON list of model ids; None: every served model
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)  # normalised: see crud.normalize_email
    password_hash: Mapped[str | None] = mapped_column(String(255))  # None: no password login (CLI-made)
    is_enabled: Mapped[bool] = mapped_column(default=True, server_default=true())  # only an operator changes it
    disabled_reason: Mapped[str | None] = mapped_column(String(200))  # what the owner is told
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=false())  # an operator
    is_self_registered: Mapped[bool] = mapped_column(default=False, server_default=false())  # made by sign-up
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id", ondelete="SET NULL"), index=True)  # None: default
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    plan: Mapped[Plan | None] = relationship()

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="account", cascade="all, delete-orphan",
                                                  passive_deletes=True, order_by="ApiKey.id")


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("budget_period IN ('day', 'month')", name="budget_period"),
        CheckConstraint("(token_budget IS NULL) = (budget_period IS NULL)", name="budget_has_period"),
        CheckConstraint("ceiling_budget_period IN ('day', 'month')", name="ceiling_budget_period"),
        CheckConstraint("(ceiling_token_budget IS NULL) = (ceiling_budget_period IS NULL)",
                        name="ceiling_budget_has_period"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # not secret; shown as "msk-<prefix>…"
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # SHA-256 hex of the raw key
    is_enabled: Mapped[bool] = mapped_column(default=True, server_default=true())
    # disabled by an operator: its owner cannot enable it again
    is_operator_disabled: Mapped[bool] = mapped_column(default=False, server_default=false())
    disabled_reason: Mapped[str | None] = mapped_column(String(200))  # the operator's, shown to the owner
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # the owner's optional limits; None: unlimited (within the ceiling and the plan)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    token_budget: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str | None] = mapped_column(String(5))  # "day" or "month", with token_budget
    # the operator's ceiling on this key: the owner may set limits below it, never lift it
    ceiling_requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    ceiling_tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    ceiling_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    ceiling_budget_period: Mapped[str | None] = mapped_column(String(5))

    account: Mapped[Account] = relationship(back_populates="api_keys")


class LoginSession(Base):
    """A web dashboard login: the cookie holds a random token, this row only its SHA-256 hash."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # SHA-256 hex of the token
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)  # slides forward while in use

    account: Mapped[Account] = relationship()


class Invite(Base):
    """An invitation to sign up, made by an operator: the code is given once, only its hash is kept."""

    __tablename__ = "invites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # SHA-256 hex of the code
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id", ondelete="SET NULL"))  # None: default
    note: Mapped[str | None] = mapped_column(String(200))  # who it is for, as the operator wrote it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    used_by_account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"))

    plan: Mapped[Plan | None] = relationship()


class Usage(Base):
    """One row per chat request that had a valid key, however it ended: its tokens and timings."""

    __tablename__ = "usage"
    __table_args__ = (
        CheckConstraint("status IN ('ok', 'error', 'limited', 'aborted')", name="status"),
        # the dashboard's and the budget's reads: one key's or one account's rows in a time range
        Index("ix_usage_key_id_created_at", "key_id", "created_at"),
        Index("ix_usage_account_id_created_at", "account_id", "created_at"),
    )

    # a 64-bit id where the table may grow large; SQLite's row id is 64-bit already, as INTEGER
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    # the completion id the client saw; unique, so a spooled row written twice is stored once
    request_id: Mapped[str] = mapped_column(String(64), index=True, unique=True)
    # kept when the key or account is deleted: the totals stay true
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"))
    model: Mapped[str] = mapped_column(String(200))  # as the client named it
    prompt_tokens: Mapped[int] = mapped_column(Integer)  # 0 when the request never reached the engine
    cached_prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)  # the tokens actually generated, all choices
    status: Mapped[str] = mapped_column(String(10))  # one of USAGE_STATUSES
    finish_reason: Mapped[str | None] = mapped_column(String(20))  # the first choice's
    http_status: Mapped[int] = mapped_column(Integer)  # 499: the client went away
    time_to_first_token_ms: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
