"""The operator's invitations under /api/admin/invites: list them, and make one (its code shown once).

Only operators (api/sessions.py `OperatorLogin`); making one needs the CSRF header.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from mistral_serve.api.deps import DbSession
from mistral_serve.api.errors import invalid_request
from mistral_serve.api.routes.plans import find_plan
from mistral_serve.api.sessions import OperatorChange, OperatorLogin
from mistral_serve.db import invites
from mistral_serve.db.models import Invite

router = APIRouter(prefix="/api/admin/invites", tags=["admin"])

MAX_INVITE_DAYS = 365


class InviteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = Field(None, max_length=1000)  # the new account's plan; null: the default plan
    note: str | None = Field(None, max_length=1000)  # who it is for
    expires_in_days: int = Field(invites.DEFAULT_INVITE_LIFETIME.days, ge=1, le=MAX_INVITE_DAYS)


class InvitePublic(BaseModel):
    id: int
    plan: str | None  # null: the default plan
    note: str | None
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_account_id: int | None  # null when unused, or when that account was deleted


class InviteList(BaseModel):
    data: list[InvitePublic]


class InviteCreated(BaseModel):
    invite: InvitePublic
    code: str  # in this response only: the table keeps its hash


@router.get("", response_model=InviteList)
def list_invites(login: OperatorLogin, db: DbSession) -> InviteList:
    """Every invitation, oldest first, used or not (never its code)."""
    return InviteList(data=[_invite_public(invite) for invite in invites.list_invites(db)])


@router.post("", status_code=201, response_model=InviteCreated)
def create_invite(body: InviteCreate, login: OperatorChange, db: DbSession) -> InviteCreated:
    """A new invitation for one sign-up, valid `expires_in_days` days (1 to 365, default 7); its code
    is in this response only. 400 `plan_not_found` for an unknown plan."""
    plan = None if body.plan is None else find_plan(db, body.plan, param="plan")
    try:
        invite, code = invites.create_invite(db, plan=plan, note=body.note or None,
                                             lifetime=timedelta(days=body.expires_in_days))
    except ValueError as error:
        raise invalid_request(f"Invalid note: {error}.", param="note", code="invalid_value") from None
    db.refresh(invite)
    return InviteCreated(invite=_invite_public(invite), code=code)


def _invite_public(invite: Invite) -> InvitePublic:
    return InvitePublic(id=invite.id, plan=invite.plan.name if invite.plan else None, note=invite.note,
                        created_at=invite.created_at, expires_at=invite.expires_at, used_at=invite.used_at,
                        used_by_account_id=invite.used_by_account_id)
