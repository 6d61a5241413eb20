"""The operator's plans under /api/admin/plans: list, create, change, make the default, delete.

A plan is named in the path (URL-encoded); a change applies to its accounts from their next request.
Only operators (api/sessions.py `OperatorLogin`); every change needs the CSRF header.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy.orm import Session

from mistral_serve.api.deps import DbSession
from mistral_serve.api.errors import APIError, invalid_request
from mistral_serve.api.sessions import OperatorChange, OperatorLogin
from mistral_serve.db import plans
from mistral_serve.db.crud import AlreadyExists
from mistral_serve.db.models import Plan
from mistral_serve.db.plans import PlanLimits

router = APIRouter(prefix="/api/admin/plans", tags=["admin"])

MAX_PLAN_MODELS = 100


# schemas

class PlanLimitsBody(BaseModel):
    """A plan's ceilings on an account, all its keys together; null (or absent): no ceiling."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    tokens_per_day: int | None = None  # per UTC day
    tokens_per_month: int | None = None  # per calendar month (UTC)
    max_keys: int | None = None
    max_n: int | None = None  # choices per request
    max_output_tokens: int | None = None  # per choice of a request
    models: list[str] | None = Field(None, max_length=MAX_PLAN_MODELS)  # null: every served model


class PlanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1000)
    limits: PlanLimitsBody = PlanLimitsBody()
    is_default: StrictBool = False


class PlanUpdate(BaseModel):
    """What is absent stays; `limits` replaces every limit at once; `is_default: false` on the default
    plan leaves accounts without a plan of their own unlimited."""

    model_config = ConfigDict(extra="forbid")

    limits: PlanLimitsBody | None = None
    is_default: StrictBool | None = None


class PlanPublic(BaseModel):
    name: str
    is_default: bool  # the plan of every account assigned none
    limits: PlanLimitsBody
    num_accounts: int  # accounts assigned this plan (not those that have it by default)
    created_at: datetime


class PlanList(BaseModel):
    data: list[PlanPublic]


# routes

@router.get("", response_model=PlanList)
def list_plans(login: OperatorLogin, db: DbSession) -> PlanList:
    """Every plan, oldest first."""
    num_accounts = plans.count_accounts_by_plan(db)
    return PlanList(data=[_plan_public(plan, num_accounts.get(plan.id, 0)) for plan in plans.list_plans(db)])


@router.post("", status_code=201, response_model=PlanPublic)
def create_plan(body: PlanCreate, login: OperatorChange, db: DbSession) -> PlanPublic:
    """A new plan; `is_default`: it becomes the plan of every account assigned none. 409 `plan_exists`."""
    limits = _plan_limits(body.limits)
    try:
        plan = plans.create_plan(db, body.name, limits, is_default=body.is_default)
    except AlreadyExists as error:
        raise APIError(409, f"{str(error).capitalize()}.", param="name", code="plan_exists") from None
    except ValueError as error:
        raise invalid_request(f"Invalid name: {error}.", param="name", code="invalid_value") from None
    return _plan_public(plan, 0)


@router.patch("/{name:path}", response_model=PlanPublic)
def update_plan(name: str, body: PlanUpdate, login: OperatorChange, db: DbSession) -> PlanPublic:
    """Replace a plan's limits, or make it the default (or no longer the default). 404 `plan_not_found`."""
    plan = find_plan(db, name)
    if body.limits is not None:
        plans.update_plan(db, plan, _plan_limits(body.limits))
    if body.is_default is not None and body.is_default != plan.is_default:
        plans.set_default_plan(db, plan if body.is_default else None)
    db.refresh(plan)
    return _plan_public(plan, plans.count_accounts_by_plan(db).get(plan.id, 0))


@router.delete("/{name:path}", status_code=204, response_class=Response)
def delete_plan(name: str, login: OperatorChange, db: DbSession) -> None:
    """Delete a plan: its accounts fall back to the default plan (the default itself: to no plan)."""
    plans.delete_plan(db, find_plan(db, name))


# what the other operator routes share

def find_plan(db: Session, name: str, param: str | None = None) -> Plan:
    """The plan named `name`: 404 `plan_not_found` in a path, 400 for a body's field `param`."""
    plan = plans.get_plan(db, name)
    if plan is None:
        message = f"No plan named {name!r}."
        if param is not None:
            raise invalid_request(message, param=param, code="plan_not_found")
        raise APIError(404, message, code="plan_not_found")
    return plan


def plan_limits_body(plan: Plan) -> PlanLimitsBody:
    limits = PlanLimits.of(plan)
    return PlanLimitsBody(**{**limits.__dict__, "models": None if limits.models is None else list(limits.models)})


def _plan_limits(body: PlanLimitsBody) -> PlanLimits:
    values = body.model_dump()
    values["models"] = None if body.models is None else tuple(body.models)
    try:
        return PlanLimits(**values)
    except ValueError as error:
        raise invalid_request(f"Invalid limits: {error}.", param="limits", code="invalid_value") from None


def _plan_public(plan: Plan, num_accounts: int) -> PlanPublic:
    return PlanPublic(name=plan.name, is_default=plan.is_default, limits=plan_limits_body(plan),
                      num_accounts=num_accounts, created_at=plan.created_at)
