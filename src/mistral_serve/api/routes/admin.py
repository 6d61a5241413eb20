"""The operator's accounts and keys under /api/admin: every account with its usage, and what only an
operator decides: an account's plan, role and state, a key's state and ceiling (plans and invitations:
routes/plans.py, routes/invites.py).

Only operators (api/sessions.py `OperatorLogin`: 403 `not_an_operator` for any other account); every
change needs the CSRF header. A disabled account or key is refused from its next request, in every
replica: each request reads its key from the database. An operator cannot disable or demote their own
account, so the platform never loses its last operator by a slip of the hand.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy.orm import Session

from mistral_serve.api.deps import DbSession, State
from mistral_serve.api.errors import APIError, invalid_request
from mistral_serve.api.routes.account_keys import KeyList, KeyPublic, Limits, key_limits, key_list, key_public, parse_id
from mistral_serve.api.routes.plans import find_plan
from mistral_serve.api.sessions import OperatorChange, OperatorLogin
from mistral_serve.db import crud, plans
from mistral_serve.db.crud import UsageTotal
from mistral_serve.db.models import Account, ApiKey, utcnow

router = APIRouter(prefix="/api/admin", tags=["admin"])

RECENT_USAGE_DAYS = 30


# schemas

class UsageSums(BaseModel):
    requests: int
    tokens: int  # prompt and completion


class AccountUsage(BaseModel):
    last_30_days: UsageSums
    all_time: UsageSums


class AccountRow(BaseModel):
    id: int
    email: str
    is_admin: bool
    is_enabled: bool
    disabled_reason: str | None  # the operator's, shown to the owner
    is_self_registered: bool  # made by sign-up, not by an operator
    plan: str | None  # the plan assigned; null: the default plan
    created_at: datetime
    num_keys: int
    usage: AccountUsage


class AccountList(BaseModel):
    data: list[AccountRow]


class AccountUpdate(BaseModel):
    """What is absent stays. `plan`: a plan's name, or null for the default plan."""

    model_config = ConfigDict(extra="forbid")

    is_enabled: StrictBool | None = None
    disabled_reason: str | None = Field(None, max_length=1000)  # with is_enabled: false
    plan: str | None = Field(None, max_length=1000)
    is_admin: StrictBool | None = None


class KeyOperatorUpdate(BaseModel):
    """What is absent stays. `ceiling` replaces all four at once; null limits in it: no ceiling."""

    model_config = ConfigDict(extra="forbid")

    is_enabled: StrictBool | None = None
    disabled_reason: str | None = Field(None, max_length=1000)  # with is_enabled: false
    ceiling: Limits | None = None


# accounts

@router.get("/accounts", response_model=AccountList)
def list_accounts(login: OperatorLogin, db: DbSession) -> AccountList:
    """Every account, oldest first, with its plan, its number of keys and its usage (the last 30 days
    and all time)."""
    return AccountList(data=_account_rows(db, crud.list_accounts(db)))


@router.patch("/accounts/{account_id}", response_model=AccountRow)
def update_account(account_id: str, body: AccountUpdate, login: OperatorChange, db: DbSession,
                   state: State) -> AccountRow:
    """Disable an account (with a reason its owner is shown) or enable it, put it on a plan, or make it
    an operator or not. Its keys are refused from their next request while it is disabled. 403
    `cannot_disable_self` or `cannot_demote_self` for the operator's own account."""
    account = _account(db, account_id)
    if account.id == login.account.id and body.is_enabled is False:
        raise APIError(403, "You cannot disable your own account: another operator can.", param="is_enabled",
                       code="cannot_disable_self")
    if account.id == login.account.id and body.is_admin is False:
        raise APIError(403, "You cannot stop being an operator yourself: another operator can demote you.",
                       param="is_admin", code="cannot_demote_self")
    _check_reason(body.is_enabled, body.disabled_reason)
    changes_plan = "plan" in body.model_fields_set
    plan = find_plan(db, body.plan, param="plan") if changes_plan and body.plan is not None else None
    if body.is_enabled is not None:
        try:
            crud.set_account_enabled(db, account, body.is_enabled, body.disabled_reason)
        except ValueError as error:
            raise invalid_request(f"Invalid reason: {error}.", param="disabled_reason", code="invalid_value") from None
    if changes_plan:
        plans.assign_plan(db, account, plan)
    if body.is_admin is not None:
        crud.set_account_admin(db, account, body.is_admin)
    state.keys.forget(account_id=account.id)  # not even a database outage lets its keys in as they were
    [row] = _account_rows(db, [account], account_id=account.id)
    return row


@router.get("/accounts/{account_id}/keys", response_model=KeyList)
def list_account_keys(account_id: str, login: OperatorLogin, db: DbSession) -> KeyList:
    """The account's keys, oldest first, with their limits, ceilings and all-time usage."""
    return key_list(db, _account(db, account_id))


# keys

@router.patch("/keys/{key_id}", response_model=KeyPublic)
def update_key(key_id: str, body: KeyOperatorUpdate, login: OperatorChange, db: DbSession,
               state: State) -> KeyPublic:
    """Disable a key (its owner cannot enable it again, and is shown the reason) or enable it, or set
    its ceiling: the owner's limits stay, the tighter applies, and the owner can set none above it."""
    numeric_id = parse_id(key_id)
    key = None if numeric_id is None else crud.get_key(db, numeric_id)
    if key is None:
        raise APIError(404, f"No key with the id {key_id!r}.", code="key_not_found")
    _check_reason(body.is_enabled, body.disabled_reason)
    ceiling = None if body.ceiling is None else key_limits(body.ceiling)
    if body.is_enabled is not None:
        try:
            crud.set_key_enabled_by_operator(db, key, body.is_enabled, body.disabled_reason)
        except ValueError as error:
            raise invalid_request(f"Invalid reason: {error}.", param="disabled_reason", code="invalid_value") from None
    if ceiling is not None:
        crud.set_key_ceiling(db, key, ceiling)
    state.keys.forget(key_id=key.id)
    return key_public(key, _key_usage(db, key))


# helpers

def _account(db: Session, account_id: str) -> Account:
    numeric_id = parse_id(account_id)
    account = None if numeric_id is None else crud.get_account(db, numeric_id)
    if account is None:
        raise APIError(404, f"No account with the id {account_id!r}.", code="account_not_found")
    return account


def _check_reason(is_enabled: bool | None, reason: str | None) -> None:
    if reason is not None and is_enabled is not False:
        raise invalid_request("A disabled_reason goes with is_enabled: false.", param="disabled_reason",
                              code="invalid_value")


def _account_rows(db: Session, accounts: list[Account], account_id: int | None = None) -> list[AccountRow]:
    """The rows of `accounts` (their keys loaded), their usage summed in two grouped queries (of
    `account_id`, or of all accounts)."""
    since = utcnow() - timedelta(days=RECENT_USAGE_DAYS)
    recent = _sums_by_account(crud.usage_totals(db, account_id=account_id, since=since, by=("account",)))
    all_time = _sums_by_account(crud.usage_totals(db, account_id=account_id, by=("account",)))
    plan_names = {plan.id: plan.name for plan in plans.list_plans(db)}
    nothing = UsageSums(requests=0, tokens=0)
    return [AccountRow(id=account.id, email=account.email, is_admin=account.is_admin, is_enabled=account.is_enabled,
                       disabled_reason=account.disabled_reason, is_self_registered=account.is_self_registered,
                       plan=plan_names.get(account.plan_id), created_at=account.created_at,
                       num_keys=len(account.api_keys),
                       usage=AccountUsage(last_30_days=recent.get(account.id, nothing),
                                          all_time=all_time.get(account.id, nothing)))
            for account in accounts]


def _sums_by_account(totals: list[UsageTotal]) -> dict[int, UsageSums]:
    return {total.account_id: UsageSums(requests=total.num_requests, tokens=total.total_tokens)
            for total in totals if total.account_id is not None}


def _key_usage(db: Session, key: ApiKey) -> UsageTotal | None:
    totals = crud.usage_totals(db, account_id=key.account_id, by=("key",))
    return next((total for total in totals if total.key_id == key.id), None)
