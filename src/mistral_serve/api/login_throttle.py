"""The brakes on password guessing and on opening accounts.

Passwords (log-ins, and the confirmations that changing the password and deleting the account ask for):

- Each attempt is charged to its budgets *before* its password is checked, in one atomic step of the
  counters (`api/brake.py`): 30 guesses sent at once are 30 charges, and only those within the
  budget get their password checked; the rest get 429 `too_many_attempts` with Retry-After.
- A browser that has logged in to the account before carries a device cookie for its email
  (`api/device_cookies.py`). Its attempts are counted against that device alone (DEVICE), never
  against the account or the address: whatever strangers try, from wherever, the owner's browser
  keeps logging in.
- Any other attempt is counted against the email (ACCOUNT, known or not: the same for both) and
  against the client's address (ADDRESS). Both budgets step up, as a few a minute, more a quarter
  hour, more an hour: a guesser is slowed to a crawl, and the owner of a guessed email who comes
  from a new browser waits minutes, not a day.
- A right password is refunded: what the budgets count is wrong passwords (and attempts in flight),
  so many people logging in behind one address never brake each other by succeeding.

Sign-ups are counted against the client's address (SIGNUP), whatever their outcome.

The counters are the rate limiter's, so with Redis every replica brakes the same guesser. If they
cannot be reached, attempts go on unbraked and a warning is logged. The client's address is the one
uvicorn established: the peer, or, with --forwarded-allow-ips, what a trusted proxy forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import time
from typing import Annotated

from anyio import from_thread
from fastapi import Depends, Request, Response

from mistral_serve.api.brake import Attempt, Brake, Budget, Tier
from mistral_serve.api.device_cookies import DeviceCookies
from mistral_serve.api.errors import APIError
from mistral_serve.api.counters import Clock, Counters, CountersUnavailable
from mistral_serve.api.sessions import client_address, is_https

log = logging.getLogger(__name__)

ACCOUNT = Budget("account", (Tier(60, 5), Tier(15 * 60, 10), Tier(60 * 60, 20)))
ADDRESS = Budget("address", (Tier(60, 10), Tier(15 * 60, 30), Tier(60 * 60, 100)))
DEVICE = Budget("device", (Tier(60, 5), Tier(15 * 60, 10), Tier(60 * 60, 20)))
SIGNUP = Budget("signup", (Tier(60 * 60, 5),))


class LoginThrottle:
    def __init__(self, counters: Counters, clock: Clock = time.time):
        self.brake = Brake(counters, clock)

    async def charge_password(self, email: str, address: str, device_id: str | None) -> Attempt:
        """One password attempt for `email` from `address`, by the device `device_id` if its cookie is
        one for `email`."""
        subjects = [(DEVICE, device_id)] if device_id else [(ACCOUNT, email), (ADDRESS, address)]
        return await self._charge(subjects)

    async def charge_signup(self, address: str) -> Attempt:
        return await self._charge([(SIGNUP, address)])

    async def refund(self, attempt: Attempt) -> None:
        try:
            await self.brake.refund(attempt)
        except CountersUnavailable as error:
            log.warning("log-in brake unavailable, a right password stays counted: %s", error)

    async def _charge(self, subjects: Sequence[tuple[Budget, str]]) -> Attempt:
        try:
            return await self.brake.charge(subjects)
        except CountersUnavailable as error:
            log.warning("log-in brake unavailable, letting the attempt through: %s", error)
            return Attempt(())


class PasswordGuard:
    """The brakes as one request's route uses them. The routes run in worker threads: each call
    runs the counters on the event loop, and a refusal is raised as the 429."""

    def __init__(self, request: Request, throttle: LoginThrottle, devices: DeviceCookies):
        self.request = request
        self.throttle = throttle
        self.devices = devices

    def charge_password(self, email: str) -> Attempt:
        device_id = self.devices.device_of(self.request, email)
        attempt = from_thread.run(self.throttle.charge_password, email, client_address(self.request), device_id)
        if attempt.is_refused:
            raise APIError(429, f"Too many failed password attempts; try again in {attempt.retry_after_s} seconds.",
                           code="too_many_attempts", headers={"Retry-After": str(attempt.retry_after_s)})
        return attempt

    def refund(self, attempt: Attempt) -> None:
        """The password was right: the attempt costs nothing."""
        from_thread.run(self.throttle.refund, attempt)

    def trust_device(self, response: Response, email: str) -> None:
        """This browser logged in as `email`: from now on its attempts are braked on their own."""
        self.devices.set_cookie(self.request, response, email, is_https=is_https(self.request))

    def charge_signup(self) -> None:
        attempt = from_thread.run(self.throttle.charge_signup, client_address(self.request))
        if attempt.is_refused:
            raise APIError(429, f"Too many sign-ups from your address; try again in {attempt.retry_after_s} "
                                "seconds.", code="too_many_signups",
                           headers={"Retry-After": str(attempt.retry_after_s)})


async def password_guard(request: Request) -> PasswordGuard:
    state = request.app.state
    return PasswordGuard(request, state.login_throttle, state.device_cookies)


Guard = Annotated[PasswordGuard, Depends(password_guard)]
