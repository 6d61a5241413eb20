"""The web dashboard's API under /api/account: sign up, log in and out, the account and its usage (its
keys: routes/account_keys.py).

JSON in and out; errors in the OpenAI envelope. Authentication is the session cookie of
`api/sessions.py`; every state-changing request but signup and login needs the CSRF header. Password
attempts (log-ins and confirmations) and sign-ups are braked as `api/login_throttle.py` describes:
counted before the password is checked, per device for a browser that logged in before, else per
email and per client address; and sign-up answers alike whether an email has an account or not.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mistral_serve.api.deps import DbSession, State
from mistral_serve.api.errors import APIError, invalid_request
from mistral_serve.api.login_throttle import Guard
from mistral_serve.api.routes.plans import PlanLimitsBody, plan_limits_body
from mistral_serve.api.sessions import (CSRF_COOKIE, SESSION_COOKIE, ChangingLogin, CurrentLogin, Login,
                                        clear_session_cookies, require_csrf, set_session_cookies, start_session)
from mistral_serve.db import crud, invites, plans
from mistral_serve.db.crud import UsageTotal
from mistral_serve.security import check_new_password, generate_token, verify_password

router = APIRouter(prefix="/api/account", tags=["account"])

DEFAULT_USAGE_DAYS = 30
# a bound on parsing only: security.MAX_PASSWORD_CHARS is the policy, answered as weak_password, not a parse error
MAX_PASSWORD_FIELD_CHARS = 4096
SIGNUP_ACCEPTED = "Now log in with this email and password. (An email that had an account keeps it, unchanged.)"


# schemas: one per use, so that no hash can reach a response

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Credentials(_Body):
    email: str = Field(max_length=320)
    password: str = Field(max_length=MAX_PASSWORD_FIELD_CHARS)


class Signup(Credentials):
    invite_code: str | None = Field(None, max_length=200)  # needed when the server takes invitations only


class SignupPolicy(BaseModel):
    mode: Literal["closed", "invite", "open"]


class PasswordChange(_Body):
    current_password: str = Field(max_length=MAX_PASSWORD_FIELD_CHARS)
    new_password: str = Field(max_length=MAX_PASSWORD_FIELD_CHARS)


class PasswordConfirmation(_Body):
    password: str = Field(max_length=MAX_PASSWORD_FIELD_CHARS)


class AccountPlan(BaseModel):
    name: str
    limits: PlanLimitsBody


class AccountPublic(BaseModel):
    email: str
    created_at: datetime
    is_admin: bool  # an operator: the dashboard shows the operator's pages
    plan: AccountPlan | None  # the plan that applies (its own, else the default); null: no limits


class SignupAccepted(BaseModel):
    """The one answer to a valid sign-up, whether its email had an account already or not."""

    message: str = SIGNUP_ACCEPTED


class LoggedIn(BaseModel):
    email: str


class UsageRow(BaseModel):
    """One group of usage: the group's field (`day`, `key_id` + `key_name`, or `model`), then its sums."""

    day: date | None = None
    key_id: int | None = None  # null: a deleted key
    key_name: str | None = None
    model: str | None = None
    requests: int
    failed_requests: int  # error, limited or aborted
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


class UsageList(BaseModel):
    data: list[UsageRow]


# signing up, logging in and out

@router.get("/signup", response_model=SignupPolicy)
def signup_policy(state: State) -> SignupPolicy:
    """Who may sign up here: `closed` (operators make accounts), `invite` (with an invitation code) or `open`."""
    return SignupPolicy(mode=state.settings.signup_mode)


@router.post("/signup", status_code=202, response_model=SignupAccepted)
def signup(body: Signup, db: DbSession, guard: Guard, state: State) -> SignupAccepted:
    """Open an account with this email and password; then log in with them. The email is stored trimmed
    and in lower case; the password has 8 to 1024 characters. 202, the same body and no cookie whether
    the email is new or has an account already (which is left as it was), after the same work: sign-up
    tells no one which emails have accounts. 403 `signup_closed` when the server's sign-up is closed,
    `invite_required` or `invalid_invite` when it takes invitations only (`invite_code`); 400
    `invalid_email` or `weak_password`; 429 `too_many_signups` (with Retry-After) past 5 sign-ups an
    hour from one client address."""
    mode = state.settings.signup_mode
    if mode == "closed":
        raise APIError(403, "Sign-up is closed on this server: ask its operator for an account.",
                       code="signup_closed")
    if mode == "invite" and not body.invite_code:
        raise APIError(403, "This server takes sign-ups by invitation only: give the invite_code its operator sent "
                            "you.", param="invite_code", code="invite_required")
    guard.charge_signup()
    try:
        email = crud.normalize_email(body.email)
    except ValueError:
        raise invalid_request("That is not an email address.", param="email", code="invalid_email") from None
    _check_new_password(body.password, "password")
    return _open_account(db, email, body.password, body.invite_code if mode == "invite" else None)


def _open_account(db: DbSession, email: str, password: str, invite_code: str | None) -> SignupAccepted:
    """The account, unless the email has one; the answer does not say which (the password is hashed
    either way, before the insert is tried). With an invitation, a taken email leaves the code unused."""
    try:
        if invite_code is None:
            crud.create_account(db, email, password, is_self_registered=True)
        else:
            invites.sign_up_with_invite(db, invite_code, email, password)
    except crud.AlreadyExists:
        pass
    except invites.InviteRefused as refusal:
        raise APIError(403, str(refusal), param="invite_code", code="invalid_invite") from None
    return SignupAccepted()


@router.post("/login", response_model=LoggedIn)
def login(body: Credentials, request: Request, response: Response, db: DbSession, guard: Guard) -> LoggedIn:
    """Log in, and mark this browser with a device cookie for the email. 401 `invalid_credentials` for a
    wrong password and an unknown email alike; 403 `account_disabled` for a disabled account's right
    password (with the operator's reason); 429 `too_many_attempts` (with Retry-After) while the brake holds.

    The brake counts each attempt before its password is checked, atomically (on every replica alike
    with Redis), and refunds a right one. From a browser with this email's device cookie: 5 wrong
    passwords a minute, 10 a quarter hour, 20 an hour, for that browser alone, so strangers can never
    lock the owner out of it. From anywhere else: the same budget for the email, and 10, 30, 100 for
    the client's address."""
    attempt = guard.charge_password(body.email.strip().lower())  # before the check: parallel guesses count too
    account = crud.get_account_by_email(db, body.email)
    check = verify_password(account.password_hash if account else None, body.password)  # same work if unknown
    if not check.is_valid:
        raise APIError(401, "Wrong email or password.", code="invalid_credentials")
    guard.refund(attempt)
    if check.needs_rehash:
        crud.set_password(db, account, body.password)
    if not account.is_enabled:
        reason = account.disabled_reason
        raise APIError(403, "This account was disabled by the operator" + (f": {reason}." if reason else "."),
                       code="account_disabled")
    start_session(request, response, db, account)
    guard.trust_device(response, account.email)
    return LoggedIn(email=account.email)


@router.post("/logout", status_code=204, response_class=Response)
def logout(request: Request, response: Response, db: DbSession) -> None:
    """End this session (if any) and clear its cookies."""
    require_csrf(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        crud.delete_login_session(db, token)
    clear_session_cookies(request, response)


# the account

@router.get("/me", response_model=AccountPublic)
def me(login: CurrentLogin, request: Request, response: Response, db: DbSession) -> AccountPublic:
    """The logged-in account, whether it is an operator, and its plan; 401 `not_logged_in`. Renews the
    cookies' lifetime (and a lost CSRF cookie)."""
    csrf_token = None if request.cookies.get(CSRF_COOKIE) else generate_token()
    set_session_cookies(request, response, login.token, csrf_token)
    plan = plans.account_plan(db, login.account)
    return AccountPublic(email=login.account.email, created_at=login.account.created_at,
                         is_admin=login.account.is_admin,
                         plan=None if plan is None else AccountPlan(name=plan.name, limits=plan_limits_body(plan)))


@router.post("/password", status_code=204, response_class=Response)
def change_password(body: PasswordChange, login: ChangingLogin, db: DbSession, guard: Guard) -> None:
    """Change the password; every other session of the account ends. 400 `wrong_password`; 429
    `too_many_attempts` as for log-ins."""
    _confirm_password(login, body.current_password, "current_password", guard)
    _check_new_password(body.new_password, "new_password")
    crud.set_password(db, login.account, body.new_password)
    crud.delete_other_login_sessions(db, login.account, keep_token=login.token)


@router.delete("", status_code=204, response_class=Response)
def delete_account(body: PasswordConfirmation, login: ChangingLogin, request: Request, response: Response,
                   db: DbSession, guard: Guard, state: State) -> None:
    """Delete the account, its keys (refused from the next request on) and its sessions; its usage is
    kept without the link. 400 `wrong_password`; 429 `too_many_attempts` as for log-ins."""
    _confirm_password(login, body.password, "password", guard)
    account_id = login.account.id
    crud.delete_account(db, login.account)
    state.keys.forget(account_id=account_id)
    clear_session_cookies(request, response)


def _confirm_password(login: Login, password: str, param: str, guard: Guard) -> None:
    """Braked as a log-in is: a stolen session is no way around the log-in brake to guess the password."""
    attempt = guard.charge_password(login.account.email)
    if not verify_password(login.account.password_hash, password).is_valid:
        raise invalid_request("The password is wrong.", param=param, code="wrong_password")
    guard.refund(attempt)


def _check_new_password(password: str, param: str) -> None:
    try:
        check_new_password(password)
    except ValueError as error:
        raise invalid_request(f"{str(error).capitalize()}.", param=param, code="weak_password") from None


# usage

def _iso_day(value):
    """YYYY-MM-DD only: pydantic would read a number ("0.0", "1700000000") as a Unix time."""
    if isinstance(value, str) and not (len(value) == 10 and value[4] == value[7] == "-"):
        raise ValueError("a day is written YYYY-MM-DD")
    return value


Day = Annotated[date, BeforeValidator(_iso_day)]


@router.get("/usage", response_model=UsageList, response_model_exclude_unset=True)
def usage(login: CurrentLogin, db: DbSession, since: Day | None = Query(None, description="first day (UTC)"),
          until: Day | None = Query(None, description="last day (UTC), included"),
          by: Literal["day", "key", "model"] = "day") -> UsageList:
    """The account's usage per UTC day, key or model, from `since` to `until` (both included; by default
    the last 30 days up to today). `key_id` and `key_name` are null for a deleted key."""
    until = until or datetime.now(timezone.utc).date()
    since = since or date.fromordinal(max(1, until.toordinal() - (DEFAULT_USAGE_DAYS - 1)))
    if since > until:
        raise invalid_request("`since` is after `until`.", param="since", code="invalid_value")
    totals = crud.usage_totals(db, account_id=login.account.id, by=(by,),
                               since=datetime.combine(since, time(), timezone.utc),
                               until=datetime.combine(_next_day(until), time(), timezone.utc))
    return UsageList(data=[_usage_row(total, by) for total in totals])


def _next_day(day: date) -> date:
    return day + timedelta(days=1) if day < date.max else day  # no usage is that late: the range may lose it


def _usage_row(total: UsageTotal, by: str) -> UsageRow:
    group = {"day": {"day": total.day}, "key": {"key_id": total.key_id, "key_name": total.key_name},
             "model": {"model": total.model}}[by]
    return UsageRow(**group, requests=total.num_requests, failed_requests=total.num_failed_requests,
                    prompt_tokens=total.prompt_tokens, cached_prompt_tokens=total.cached_prompt_tokens,
                    completion_tokens=total.completion_tokens)
