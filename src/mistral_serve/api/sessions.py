"""Web dashboard logins: the session cookie and CSRF double-submit (the brake on password guessing is
`api/login_throttle.py`).

The session cookie `msv_session` holds a random token; the database keeps only its SHA-256 (table
`sessions`), valid 14 days from its last use. A state-changing request (POST, PATCH, DELETE) must
also send the header `X-CSRF-Token` equal to the cookie `msv_csrf`, which a page on another site can
neither read nor set; signup and login, made before there is a session, are the only exceptions.
The operator's routes (/api/admin) take the same session, of an account that is an operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
import hmac
from typing import Annotated

from fastapi import Depends, Request, Response

from mistral_serve.api.deps import DbSession
from mistral_serve.api.errors import APIError
from mistral_serve.db import crud
from mistral_serve.db.models import Account
from mistral_serve.security import generate_token

SESSION_COOKIE = "msv_session"
CSRF_COOKIE = "msv_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_LIFETIME = timedelta(days=14)


def is_https(request: Request) -> bool:
    """The client reached us over HTTPS, directly or through a proxy that --forwarded-allow-ips trusts
    (uvicorn then sets the scheme from its X-Forwarded-Proto; from anyone else that header means nothing)."""
    return request.url.scheme == "https"


def set_session_cookies(request: Request, response: Response, token: str | None, csrf_token: str | None) -> None:
    """Set the session cookie (HttpOnly) and the CSRF cookie (readable by the page), where given."""
    common = dict(max_age=int(SESSION_LIFETIME.total_seconds()), path="/", samesite="lax", secure=is_https(request))
    if token is not None:
        response.set_cookie(SESSION_COOKIE, token, httponly=True, **common)
    if csrf_token is not None:
        response.set_cookie(CSRF_COOKIE, csrf_token, httponly=False, **common)


def start_session(request: Request, response: Response, db: DbSession, account: Account) -> None:
    token = crud.create_login_session(db, account, SESSION_LIFETIME)
    set_session_cookies(request, response, token, generate_token())


def clear_session_cookies(request: Request, response: Response) -> None:
    for name, is_http_only in ((SESSION_COOKIE, True), (CSRF_COOKIE, False)):
        response.delete_cookie(name, path="/", samesite="lax", secure=is_https(request), httponly=is_http_only)


@dataclass(frozen=True)
class Login:
    account: Account
    token: str  # the raw session token, from the cookie


def current_login(request: Request, db: DbSession) -> Login:
    """The logged-in account of the session cookie; 401 `not_logged_in` otherwise."""
    token = request.cookies.get(SESSION_COOKIE, "")
    login = crud.find_login_session(db, token, SESSION_LIFETIME) if token else None
    if login is None or not login.account.is_enabled:
        raise APIError(401, "You are not logged in.", code="not_logged_in")
    return Login(login.account, token)


CurrentLogin = Annotated[Login, Depends(current_login)]


def require_csrf(request: Request) -> None:
    """403 `csrf_failed` unless the X-CSRF-Token header equals the msv_csrf cookie."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    header = request.headers.get(CSRF_HEADER, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), header.encode()):
        raise APIError(403, f"Missing or wrong {CSRF_HEADER} header: send the value of the {CSRF_COOKIE} cookie.",
                       code="csrf_failed")


def current_login_with_csrf(login: CurrentLogin, request: Request) -> Login:
    """A logged-in account's state-changing request: 401 without a session, then 403 without the CSRF token."""
    require_csrf(request)
    return login


ChangingLogin = Annotated[Login, Depends(current_login_with_csrf)]


def operator_login(login: CurrentLogin) -> Login:
    """An operator's read: 401 without a session, then 403 `not_an_operator` for any other account."""
    if not login.account.is_admin:
        raise APIError(403, "Only an operator may do this.", code="not_an_operator")
    return login


def operator_login_with_csrf(login: ChangingLogin) -> Login:
    """An operator's change: 401 without a session, 403 without the CSRF token, then 403 `not_an_operator`."""
    return operator_login(login)


OperatorLogin = Annotated[Login, Depends(operator_login)]
OperatorChange = Annotated[Login, Depends(operator_login_with_csrf)]


def client_address(request: Request) -> str:
    """The client's address as uvicorn established it: the peer's, or, from a proxy that
    --forwarded-allow-ips trusts, the one it forwarded. X-Forwarded-For is never read here: from anyone
    else it is whatever the client chose to write."""
    return request.client.host if request.client else "unknown"
