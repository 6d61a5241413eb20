"""Plans: the ceilings an operator sets for accounts. Reads and writes; like crud.py, it commits.

An account's plan is the one assigned to it, else the default plan, else none: no ceiling. What is
enforced on a request is the tightest of the plan (for the account: all its keys together), the
operator's ceiling on the key, and the limits the owner set on the key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
import json

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mistral_serve.db.crud import AlreadyExists, KeyLimits, is_control
from mistral_serve.db.models import Account, Plan

MAX_PLAN_NAME_CHARS = 50
MAX_INT = 2**31 - 1  # the Integer columns'
MAX_BIGINT = 2**63 - 1
_BIG_FIELDS = ("tokens_per_day", "tokens_per_month")


@dataclass(frozen=True)
class PlanLimits:
    """A plan's ceilings; None: no ceiling on that."""

    requests_per_minute: int | None = None  # the account's requests, all its keys together
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    tokens_per_day: int | None = None  # per UTC day
    tokens_per_month: int | None = None  # per calendar month (UTC)
    max_keys: int | None = None
    max_n: int | None = None  # choices per request
    max_output_tokens: int | None = None  # per choice of a request
    models: tuple[str, ...] | None = None  # the model ids it may use; None: every served model

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "models":
                if value is not None and (not isinstance(value, tuple)
                                          or not all(isinstance(model, str) and model for model in value)):
                    raise ValueError("models must be a list of model ids")
                continue
            maximum = MAX_BIGINT if field.name in _BIG_FIELDS else MAX_INT
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= maximum):
                raise ValueError(f"{field.name} must be a whole number from 1 to {maximum}, got {value!r}")

    @classmethod
    def of(cls, plan: Plan | None) -> PlanLimits:
        if plan is None:
            return cls()
        return cls(plan.requests_per_minute, plan.tokens_per_minute, plan.max_concurrent_requests,
                   plan.tokens_per_day, plan.tokens_per_month, plan.max_keys, plan.max_n, plan.max_output_tokens,
                   None if plan.models is None else tuple(json.loads(plan.models)))

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def budgets(self) -> list[tuple[int, str]]:
        """The account's token budgets: (tokens, "day" or "month")."""
        return [(limit, period) for limit, period in ((self.tokens_per_day, "day"), (self.tokens_per_month, "month"))
                if limit is not None]

    def key_limit_above(self, limits: KeyLimits) -> str | None:
        """The first of a key's limits that this plan does not allow (a rate above the plan's, or
        unlimited where the plan has a limit, or a budget above the plan's for its period); None if none."""
        for name in ("requests_per_minute", "tokens_per_minute"):
            ceiling, value = getattr(self, name), getattr(limits, name)
            if ceiling is not None and value is not None and value > ceiling:
                return f"{name} {value} is above the plan's {ceiling}"
        if limits.token_budget is not None:
            ceiling = self.tokens_per_day if limits.budget_period == "day" else self.tokens_per_month
            if ceiling is not None and limits.token_budget > ceiling:
                return f"token_budget {limits.token_budget} per {limits.budget_period} is above the plan's {ceiling}"
        return None

    def describe(self) -> str:
        parts = [f"{value} {label}" for value, label in (
            (self.requests_per_minute, "rpm"), (self.tokens_per_minute, "tpm"),
            (self.max_concurrent_requests, "concurrent"), (self.tokens_per_day, "tokens/day"),
            (self.tokens_per_month, "tokens/month"), (self.max_keys, "keys"), (self.max_n, "max n"),
            (self.max_output_tokens, "max output tokens")) if value is not None]
        if self.models is not None:
            parts.append("models: " + ", ".join(self.models))
        return ", ".join(parts) or "no limits"


def _columns(limits: PlanLimits) -> dict:
    values = {field.name: getattr(limits, field.name) for field in fields(limits)}
    values["models"] = None if limits.models is None else json.dumps(list(limits.models))
    return values


def _plan_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_PLAN_NAME_CHARS or any(is_control(char) for char in name):
        raise ValueError(f"a plan name has 1 to {MAX_PLAN_NAME_CHARS} characters, none of them control characters")
    return name


def create_plan(session: Session, name: str, limits: PlanLimits, *, is_default: bool = False) -> Plan:
    plan = Plan(name=_plan_name(name), **_columns(limits))
    session.add(plan)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise AlreadyExists(f"a plan named {plan.name!r} exists already") from None
    if is_default:
        _make_default(session, plan)
    session.commit()
    return plan


def update_plan(session: Session, plan: Plan, limits: PlanLimits) -> Plan:
    """Replace every limit of `plan`: accounts on it get the new ceilings from their next request."""
    for name, value in _columns(limits).items():
        setattr(plan, name, value)
    session.commit()
    return plan


def set_default_plan(session: Session, plan: Plan | None) -> None:
    """`plan` becomes the plan of every account assigned none; None: such accounts have no ceiling."""
    _make_default(session, plan)
    session.commit()


def _make_default(session: Session, plan: Plan | None) -> None:
    session.execute(update(Plan).where(Plan.is_default).values(is_default=False))
    session.flush()  # the old default is cleared before the unique index sees the new one
    if plan is not None:
        plan.is_default = True
        session.flush()


def get_plan(session: Session, name: str) -> Plan | None:
    return session.scalar(select(Plan).where(Plan.name == name.strip()))


def get_plan_by_id(session: Session, plan_id: int) -> Plan | None:
    return session.get(Plan, plan_id)


def list_plans(session: Session) -> list[Plan]:
    return list(session.scalars(select(Plan).order_by(Plan.id)))


def count_accounts_by_plan(session: Session) -> dict[int, int]:
    """The number of accounts assigned each plan, in one query; a plan none is assigned is absent (the
    default plan's count leaves out the accounts that have it by default)."""
    return dict(session.execute(select(Account.plan_id, func.count()).where(Account.plan_id.is_not(None))
                                .group_by(Account.plan_id)).all())


def default_plan(session: Session) -> Plan | None:
    return session.scalar(select(Plan).where(Plan.is_default))


def delete_plan(session: Session, plan: Plan) -> None:
    """Its accounts fall back to the default plan."""
    session.delete(plan)
    session.commit()


def account_plan(session: Session, account: Account) -> Plan | None:
    """The plan that applies to `account`: its own, else the default, else None."""
    return account.plan if account.plan_id is not None else default_plan(session)


def assign_plan(session: Session, account: Account, plan: Plan | None) -> Account:
    """Put `account` on `plan` (None: on the default plan)."""
    account.plan_id = None if plan is None else plan.id
    session.commit()
    session.refresh(account)
    return account
