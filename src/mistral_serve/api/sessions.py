"""Web dashboard logins: the session cookie, CSRF double-submit, and the brake on password guessing.

The session cookie `msv_session` holds a random token; the database keeps only its SHA-256 (table
`sessions`), valid 14 days from its last use. A state-changing request (POST, PATCH, DELETE) must
also send the header `X-CSRF-Token` equal to the cookie `msv_csrf`, which a page on another site can
neither read nor set; signup and login, made before there is a session, are the only exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
import hashlib
import hmac
import logging
import math
import time
from typing import Annotated

from anyio import from_thread
from fastapi import Depends, Request, Response

from mistral_serve.api.deps import DbSession
from mistral_serve.api.errors import APIError
from mistral_serve.api.counters import Charge, Counters, CountersUnavailable
from mistral_serve.db import crud
from mistral_serve.db.models import Account
from mistral_serve.security import generate_token

SESSION_COOKIE = "msv_session"
CSRF_COOKIE = "msv_csrf"
CSRF_HEADER = "X-CSRF-Token"

log = logging.getLogger(__name__)
SESSION_LIFETIME = timedelta(days=14)


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
    """Failed password checks per account and per client address, counted in fixed windows of
    `window_s` aligned to the clock (as the rate limits are): past the limit, further attempts are
    refused (429) until the window ends. The counters are the rate limiter's, so with Redis every
    replica brakes the same guesser. Counter names carry a hash of the email or address, never the
    address itself. If the counters cannot be reached, log-ins go on unbraked (and a warning is logged).

    The methods are called from the routes' worker threads; they run the counters on the event loop."""

    def __init__(self, counters: Counters, max_failures_per_account: int = 5, max_failures_per_address: int = 20,
                 window_s: int = 15 * 60, clock=time.time):
        self.counters = counters
        self.max_failures = {"account": max_failures_per_account, "address": max_failures_per_address}
        self.window_s = window_s
        self.clock = clock

    def retry_after(self, email: str, address: str) -> int | None:
        """Seconds until `email` from `address` may try again; None if it may now."""
        now = self.clock()
        window = int(now // self.window_s)
        # a charge of 0 within max - 1: "admitted" means fewer than max failures so far
        checks = [Charge(self._name(kind, name, window), 0, self.max_failures[kind] - 1)
                  for kind, name in (("account", email), ("address", address))]
        is_allowed, _ = self._run(self.counters.charge, checks, 2 * self.window_s, default=(True, []))
        return None if is_allowed else max(1, math.ceil((window + 1) * self.window_s - now))

    def record_failure(self, email: str, address: str) -> None:
        window = int(self.clock() // self.window_s)
        for kind, name in (("account", email), ("address", address)):
            self._run(self.counters.add, self._name(kind, name, window), 1, 2 * self.window_s)

    def record_success(self, email: str) -> None:
        """The account's failures are forgotten (the address's are not)."""
        name = self._name("account", email, int(self.clock() // self.window_s))
        _, [num_failures] = self._run(self.counters.charge, [Charge(name, 0, 2**62)], 2 * self.window_s,
                                      default=(True, [0]))
        if num_failures:
            self._run(self.counters.add, name, -num_failures, 2 * self.window_s)

    @staticmethod
    def _name(kind: str, name: str, window: int) -> str:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        return f"login:{kind}:{digest}:{window}"

    @staticmethod
    def _run(operation, *args, default=None):
        try:
            return from_thread.run(operation, *args)
        except CountersUnavailable as error:
            log.warning("log-in brake unavailable, letting the attempt through: %s", error)
            return default


async def login_throttle(request: Request) -> LoginThrottle:
    """The app's throttle, made on first use (on the event loop: no race), on the limiter's counters."""
    throttle = getattr(request.app.state, "login_throttle", None)
    if throttle is None:
        counters = request.app.state.serving.limiter.counters
        throttle = request.app.state.login_throttle = LoginThrottle(counters)
    return throttle


Throttle = Annotated[LoginThrottle, Depends(login_throttle)]


def client_address(request: Request) -> str:
    """The client's address as the server saw it (behind a proxy, run uvicorn with --proxy-headers)."""
    return request.client.host if request.client else "unknown"
