"""Invitations to sign up: made by an operator, used once, before they expire. Like crud.py, it commits.

The code is shown once, when it is made; the table keeps only its SHA-256, like API keys.
"""

from __future__ import annotations

from datetime import timedelta
import hashlib

from sqlalchemy import select, update
from sqlalchemy.orm import Session, joinedload

from mistral_serve.db import crud
from mistral_serve.db.models import Account, Invite, Plan, utcnow
from mistral_serve.security import generate_token

INVITE_PREFIX = "msi-"
DEFAULT_INVITE_LIFETIME = timedelta(days=7)
MAX_NOTE_CHARS = 200


class InviteRefused(ValueError):
    """The code is unknown, used or expired: one message for all three."""


def hash_invite_code(code: str) -> str:
    return hashlib.sha256(code.strip().encode()).hexdigest()


def create_invite(session: Session, *, plan: Plan | None = None, note: str | None = None,
                  lifetime: timedelta = DEFAULT_INVITE_LIFETIME) -> tuple[Invite, str]:
    """A new invitation and its code (returned once). `plan`: the new account's; None: the default."""
    if note is not None and (len(note) > MAX_NOTE_CHARS or any(crud.is_control(char) for char in note)):
        raise ValueError(f"a note has at most {MAX_NOTE_CHARS} characters, no control characters")
    if lifetime <= timedelta(0):
        raise ValueError("an invitation must live a while: give a positive lifetime")
    code = INVITE_PREFIX + generate_token()
    now = utcnow()
    invite = Invite(code_hash=hash_invite_code(code), plan_id=None if plan is None else plan.id, note=note,
                    created_at=now, expires_at=now + lifetime)
    session.add(invite)
    session.commit()
    return invite, code


def list_invites(session: Session) -> list[Invite]:
    return list(session.scalars(select(Invite).options(joinedload(Invite.plan)).order_by(Invite.id)))


def sign_up_with_invite(session: Session, code: str, email: str, password: str) -> Account:
    """Use the invitation `code` for a new self-registered account, in one transaction: two sign-ups
    with one code make one account. InviteRefused if the code cannot be used; crud.AlreadyExists if
    the email is taken (the code stays unused)."""
    now = utcnow()
    invite = session.scalar(select(Invite).where(Invite.code_hash == hash_invite_code(code)))
    if invite is None or invite.used_at is not None or invite.expires_at <= now:
        raise InviteRefused("This invitation code is unknown, used or expired.")
    # claim it first: of two sign-ups racing on one code, only one updates the row
    claimed = session.execute(update(Invite).where(Invite.id == invite.id, Invite.used_at.is_(None))
                              .values(used_at=now).execution_options(synchronize_session=False))
    if claimed.rowcount != 1:
        session.rollback()
        raise InviteRefused("This invitation code is unknown, used or expired.")
    account = crud.create_account(session, email, password, is_self_registered=True, plan_id=invite.plan_id,
                                  commit=False)
    session.execute(update(Invite).where(Invite.id == invite.id).values(used_by_account_id=account.id)
                    .execution_options(synchronize_session=False))
    session.commit()
    return account
