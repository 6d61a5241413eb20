"""The owner's keys under /api/account/keys: list, create, change and delete them, within the plan.

The owner sets limits on a key below its account's plan and below the operator's ceiling on the key,
never above (403 `above_plan`, `above_ceiling`), makes no more keys than the plan allows (403
`max_keys_reached`), and cannot enable a key the operator disabled (403 `disabled_by_operator`).
Authentication as in accounts.py: the session cookie, and the CSRF header on every change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy.orm import Session

from mistral_serve.api.deps import DbSession, State
from mistral_serve.api.errors import APIError, invalid_request
from mistral_serve.api.sessions import ChangingLogin, CurrentLogin, Login
from mistral_serve.db import crud, plans
from mistral_serve.db.crud import KeyLimits, UsageTotal
from mistral_serve.db.models import Account, ApiKey
from mistral_serve.db.plans import PlanLimits

router = APIRouter(prefix="/api/account/keys", tags=["account"])

MAX_ID = 2**31 - 1  # an id past the column's range names nothing (PostgreSQL would refuse the query)


# schemas: one per use, so that no hash can reach a response

class Limits(BaseModel):
    """A key's limits; null (or absent): unlimited. A token budget needs its period, and the reverse."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    budget_period: Literal["day", "month"] | None = None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1000)
    limits: Limits | None = None


class KeyUpdate(BaseModel):
    """What is absent stays; `limits` replaces all four limits at once."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=1000)
    is_enabled: StrictBool | None = None
    limits: Limits | None = None


class KeyUsage(BaseModel):
    """All-time totals of the key's requests."""

    requests: int
    prompt_tokens: int
    completion_tokens: int


class KeyPublic(BaseModel):
    id: int
    name: str
    prefix: str  # the first characters after "msk-": shown as "msk-<prefix>…"
    created_at: datetime
    last_used_at: datetime | None
    is_enabled: bool
    is_operator_disabled: bool  # only an operator can enable it again
    disabled_reason: str | None  # the operator's, when it disabled the key
    limits: Limits  # the owner's
    ceiling: Limits  # the operator's: the owner's limits stay below it
    usage: KeyUsage


class KeyList(BaseModel):
    data: list[KeyPublic]


class KeyCreated(BaseModel):
    key: KeyPublic
    secret: str  # the raw key: in this response only, never again


# routes

@router.get("", response_model=KeyList)
def list_keys(login: CurrentLogin, db: DbSession) -> KeyList:
    """The account's keys, oldest first, each with its all-time usage and the operator's ceiling."""
    return key_list(db, login.account)


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, login: ChangingLogin, db: DbSession) -> KeyCreated:
    """A new enabled key. Its secret is in this response only: it is stored as a hash. 403
    `max_keys_reached` when the account has as many keys as its plan allows; 403 `above_plan` for
    limits above the plan's."""
    limits = key_limits(body.limits or Limits())
    plan = plans.account_plan(db, login.account)
    limit = PlanLimits.of(plan)
    # counted before the insert: two requests at the same instant may make one key more than the plan's
    if limit.max_keys is not None and crud.count_account_keys(db, login.account) >= limit.max_keys:
        keys = "1 key" if limit.max_keys == 1 else f"{limit.max_keys} keys"
        raise APIError(403, f"Your plan{_named(plan)} allows {keys}, and this account has them all: delete one "
                            "to make another.", code="max_keys_reached")
    _check_plan(limit, plan, limits)
    try:
        key, secret = crud.create_api_key(db, login.account, body.name, limits)
    except ValueError as error:
        raise invalid_request(f"Invalid name: {error}.", param="name", code="invalid_value") from None
    return KeyCreated(key=key_public(key, None), secret=secret)


@router.patch("/{key_id}", response_model=KeyPublic)
def update_key(key_id: str, body: KeyUpdate, login: ChangingLogin, db: DbSession, state: State) -> KeyPublic:
    """Rename, enable or disable a key, or replace its limits. A disabled key is refused from its next
    request. 403 `disabled_by_operator` to enable a key the operator disabled; 403 `above_ceiling` or
    `above_plan` for limits above the operator's ceiling on the key or the account's plan."""
    key = _own_key(db, login, key_id)
    limits = None if body.limits is None else key_limits(body.limits)
    if limits is not None:
        above = limits.above(KeyLimits.ceiling_of(key))
        if above is not None:
            raise APIError(403, f"The operator set a ceiling on this key: {above}.", param="limits",
                           code="above_ceiling")
        plan = plans.account_plan(db, login.account)
        _check_plan(PlanLimits.of(plan), plan, limits)
    try:
        crud.update_key(db, key, name=body.name, is_enabled=body.is_enabled, limits=limits)
    except crud.OperatorDecision as decision:
        raise APIError(403, str(decision), param="is_enabled", code="disabled_by_operator") from None
    except ValueError as error:
        raise invalid_request(f"Invalid name: {error}.", param="name", code="invalid_value") from None
    state.keys.forget(key_id=key.id)  # other replicas see the change within a second
    return key_public(key, _usage_by_key(db, login.account).get(key.id))


@router.delete("/{key_id}", status_code=204, response_class=Response)
def delete_key(key_id: str, login: ChangingLogin, db: DbSession, state: State) -> None:
    """Delete a key: refused from its next request on; its usage is kept."""
    key = _own_key(db, login, key_id)
    numeric_id = key.id
    crud.delete_key(db, key)
    state.keys.forget(key_id=numeric_id)


# what the operator's routes share

def parse_id(value: str) -> int | None:
    """A path's id as a number, None if it names nothing ("³" is a digit, not a number)."""
    return int(value) if value.isascii() and value.isdigit() and 0 < int(value) <= MAX_ID else None


def key_limits(limits: Limits) -> KeyLimits:
    try:
        return KeyLimits(**limits.model_dump())
    except ValueError as error:
        raise invalid_request(f"Invalid limits: {error}.", param="limits", code="invalid_value") from None


def key_list(db: Session, account: Account) -> KeyList:
    usage = _usage_by_key(db, account)
    return KeyList(data=[key_public(key, usage.get(key.id)) for key in crud.list_keys(db, account)])


def key_public(key: ApiKey, usage: UsageTotal | None) -> KeyPublic:
    return KeyPublic(
        id=key.id, name=key.name, prefix=key.prefix, created_at=key.created_at, last_used_at=key.last_used_at,
        is_enabled=key.is_enabled, is_operator_disabled=key.is_operator_disabled,
        disabled_reason=key.disabled_reason, limits=Limits(**KeyLimits.of(key).__dict__),
        ceiling=Limits(**KeyLimits.ceiling_of(key).__dict__),
        usage=KeyUsage(requests=usage.num_requests if usage else 0, prompt_tokens=usage.prompt_tokens if usage else 0,
                       completion_tokens=usage.completion_tokens if usage else 0))


def _own_key(db: Session, login: Login, key_id: str) -> ApiKey:
    """The account's key `key_id`: 404 for another account's key exactly as for an unknown one."""
    numeric_id = parse_id(key_id)
    key = None if numeric_id is None else crud.get_account_key(db, login.account, numeric_id)
    if key is None:
        raise APIError(404, f"No key with the id {key_id!r}.", code="key_not_found")
    return key


def _check_plan(limit: PlanLimits, plan, limits: KeyLimits) -> None:
    above = limit.key_limit_above(limits)
    if above is not None:
        raise APIError(403, f"Your plan{_named(plan)} does not allow this: {above}.", param="limits",
                       code="above_plan")


def _named(plan) -> str:
    return f" ({plan.name})" if plan is not None else ""


def _usage_by_key(db: Session, account: Account) -> dict[int, UsageTotal]:
    return {total.key_id: total for total in crud.usage_totals(db, account_id=account.id, by=("key",))}
