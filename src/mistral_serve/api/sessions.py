"""Web dashboard logins: the session cookie, CSRF double-submit, and the brake on password guessing.

The session cookie `msv_session` holds a random token; the database keeps only its SHA-256 (table
`sessions`), valid 14 days from its last use. A state-changing request (POST, PATCH, DELETE) must
also send the header `X-CSRF-Token` equal to the cookie `msv_csrf`, which a page on another site can
neither read nor set; signup and login, made before there is a session, are the only exceptions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta
import hmac
import math
import threading
import time
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
MAX_TRACKED = 100_000  # (account or address) entries the login throttle keeps before sweeping


def is_https(request: Request) -> bool:
    """The client reached us over HTTPS, directly or through a proxy that says so."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


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


class LoginThrottle:
    """Failed password checks per account and per client address in a sliding window; past the limit,
    further attempts are refused (429) until the oldest failure leaves the window.

    The counts live in this process: with several replicas, each brakes on its own."""

    def __init__(self, max_failures_per_account: int = 5, max_failures_per_address: int = 20,
                 window_s: float = 15 * 60, clock=time.monotonic):
        self.max_failures = {"account": max_failures_per_account, "address": max_failures_per_address}
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()  # routes run in a threadpool

    def retry_after(self, email: str, address: str) -> int | None:
        """Seconds until `email` from `address` may try again; None if it may now."""
        waits = []
        with self._lock:
            now = self.clock()
            for kind, name in (("account", email), ("address", address)):
                times = self._recent(kind, name, now)
                if len(times) >= self.max_failures[kind]:
                    waits.append(times[0] + self.window_s - now)
        return max(1, math.ceil(max(waits))) if waits else None

    def record_failure(self, email: str, address: str) -> None:
        with self._lock:
            now = self.clock()
            for kind, name in (("account", email), ("address", address)):
                self._failures.setdefault((kind, name), deque()).append(now)
            if len(self._failures) > MAX_TRACKED:  # a spray of emails or addresses: forget what has expired
                for entry in [entry for entry, times in self._failures.items()
                              if times[-1] <= now - self.window_s]:
                    del self._failures[entry]

    def record_success(self, email: str) -> None:
        with self._lock:
            self._failures.pop(("account", email), None)

    def _recent(self, kind: str, name: str, now: float) -> deque[float]:
        """The failures of (kind, name) in the window, oldest first."""
        times = self._failures.get((kind, name), deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times


async def login_throttle(request: Request) -> LoginThrottle:
    """The app's throttle, made on first use (on the event loop: no race)."""
    throttle = getattr(request.app.state, "login_throttle", None)
    if throttle is None:
        throttle = request.app.state.login_throttle = LoginThrottle()
    return throttle


Throttle = Annotated[LoginThrottle, Depends(login_throttle)]


def client_address(request: Request) -> str:
    """The client's address as the server saw it (behind a proxy, run uvicorn with --proxy-headers)."""
    return request.client.host if request.client else "unknown"
