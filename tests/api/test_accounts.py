"""The dashboard API under /api/account, over real HTTP with a cookie jar per browser: sessions and
their cookies, CSRF, log-in brakes, passwords, keys and usage, and one account never reaching another's."""

from __future__ import annotations

from argon2 import PasswordHasher
import httpx
import pytest
from sqlalchemy import select, text

from mistral_serve.api.counters import InProcessCounters
from mistral_serve.api.login_throttle import LoginThrottle
from mistral_serve.db.models import Account, LoginSession, Usage
from tests.api.conftest import bearer, chat
from tests.api.helpers import PASSWORD, Browser, error_code, signed_up
from tests.conftest import DATABASE_BACKENDS

API_DB_BACKENDS = DATABASE_BACKENDS
pytestmark = pytest.mark.usefixtures("fresh_throttle")  # the tests all log in from the same address


def logged_in(base_url: str, email: str, password: str = PASSWORD) -> Browser:
    browser = Browser(base_url)
    response = browser.post("/login", {"email": email, "password": password})
    assert response.status_code == 200, response.text
    return browser


def chat_status(base_url: str, secret: str) -> int:
    return httpx.post(base_url + "/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(secret),
                      timeout=60).status_code


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Each Set-Cookie header by cookie name, as sent."""
    return {header.split("=", 1)[0]: header for header in response.headers.get_list("set-cookie")}


# signing up, logging in and out

def test_login_sets_httponly_lax_session_cookies_and_a_strict_device_cookie(live_url, api_db):
    browser = Browser(live_url)
    assert browser.post("/signup", {"email": "  Cookie@Example.COM ", "password": PASSWORD}).status_code == 202
    # a client's own X-Forwarded-Proto is no proxy's word: the cookies stay fit for plain HTTP
    response = browser.post("/login", {"email": "cookie@example.com", "password": PASSWORD},
                            headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 200 and response.json()["email"] == "cookie@example.com"
    cookies = {name: cookie.lower() for name, cookie in set_cookies(response).items()}
    assert set(cookies) == {"msv_session", "msv_csrf", "msv_device"}
    assert "httponly" in cookies["msv_session"] and "httponly" not in cookies["msv_csrf"]
    for name in ("msv_session", "msv_csrf"):
        assert "samesite=lax" in cookies[name] and "path=/;" in cookies[name] + ";"
    assert "httponly" in cookies["msv_device"] and "samesite=strict" in cookies["msv_device"]
    assert "path=/api/account" in cookies["msv_device"]
    assert not any("secure" in cookie for cookie in cookies.values())
    assert browser.get("/me").json()["email"] == "cookie@example.com"
    # only the token's hash is stored
    token = browser.http.cookies["msv_session"]
    with api_db() as db:
        hashes = db.scalars(select(LoginSession.token_hash)).all()
    assert token not in hashes and len(hashes) >= 1


def test_signup_answers_a_taken_email_as_a_new_one_and_leaves_its_account_alone(live_url):
    owner = signed_up(live_url, "taken@example.com")
    taken = Browser(live_url).post("/signup", {"email": "TAKEN@example.com ", "password": "the squatter's own"})
    new = Browser(live_url).post("/signup", {"email": "fresh@example.com", "password": "the squatter's own"})
    assert (taken.status_code, taken.json()) == (new.status_code, new.json()) == (202, new.json())
    assert "set-cookie" not in taken.headers and "set-cookie" not in new.headers
    assert owner.get("/me").status_code == 200
    squatter = Browser(live_url).post("/login", {"email": "taken@example.com", "password": "the squatter's own"})
    assert error_code(squatter) == "invalid_credentials"
    assert logged_in(live_url, "taken@example.com")
    assert logged_in(live_url, "fresh@example.com", "the squatter's own")


def test_signup_refuses_weak_passwords_and_non_addresses(live_url):
    for email, password, code in [("short@example.com", "1234567", "weak_password"),
                                  ("long@example.com", "x" * 1025, "weak_password"),
                                  ("not-an-address", PASSWORD, "invalid_email")]:
        response = Browser(live_url).post("/signup", {"email": email, "password": password})
        assert (response.status_code, error_code(response)) == (400, code)
        assert "set-cookie" not in response.headers


def test_sign_ups_are_braked_per_client_address(live_url, app):
    now = [1000.0]
    app.state.login_throttle = LoginThrottle(InProcessCounters(), clock=lambda: now[0])
    answers = [Browser(live_url).post("/signup", {"email": f"many{n}@example.com", "password": PASSWORD})
               for n in range(6)]
    assert [answer.status_code for answer in answers] == [202] * 5 + [429]
    assert error_code(answers[-1]) == "too_many_signups"
    assert 0 < int(answers[-1].headers["retry-after"]) <= 60 * 60
    assert Browser(live_url).post("/login", {"email": "many5@example.com", "password": PASSWORD}).status_code == 401
    now[0] += 60 * 60
    assert Browser(live_url).post("/signup", {"email": "many5@example.com", "password": PASSWORD}).status_code == 202


def test_wrong_password_and_unknown_email_get_the_same_401(live_url):
    signed_up(live_url, "known@example.com")
    wrong = Browser(live_url).post("/login", {"email": "known@example.com", "password": "not the password"})
    unknown = Browser(live_url).post("/login", {"email": "nobody@example.com", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert error_code(wrong) == "invalid_credentials"
    assert "set-cookie" not in wrong.headers
    assert logged_in(live_url, " Known@EXAMPLE.com").get("/me").status_code == 200


def test_logout_ends_the_session_and_clears_both_cookies(live_url, api_db):
    browser = signed_up(live_url, "logout@example.com")
    token = browser.http.cookies["msv_session"]
    assert browser.post("/logout", csrf=False).status_code == 403
    response = browser.post("/logout")
    assert response.status_code == 204
    assert set(set_cookies(response)) == {"msv_session", "msv_csrf"}
    assert "msv_session" not in browser.http.cookies and "msv_csrf" not in browser.http.cookies
    assert error_code(browser.get("/me")) == "not_logged_in"
    # the old cookie, replayed, is worth nothing: its row is gone
    replay = httpx.get(live_url + "/api/account/me", cookies={"msv_session": token})
    assert replay.status_code == 401
    with api_db() as db:
        account = db.scalar(select(Account).where(Account.email == "logout@example.com"))
        assert db.scalars(select(LoginSession).where(LoginSession.account_id == account.id)).all() == []


def stranger_guesses(base_url: str, email: str) -> httpx.Response:
    return Browser(base_url).post("/login", {"email": email, "password": "guess"})


def test_failed_logins_are_braked_per_account_and_address_but_never_on_the_owners_browser(live_url, app):
    now = [1000.0 * 3600]  # an hour's first second: every window starts here
    app.state.login_throttle = LoginThrottle(InProcessCounters(), clock=lambda: now[0])
    owner = signed_up(live_url, "guessed@example.com")  # this browser now holds a device cookie
    assert owner.post("/logout").status_code == 204
    signed_up(live_url, "bystander@example.com")
    for _ in range(5):
        assert stranger_guesses(live_url, "guessed@example.com").status_code == 401
    # from a new browser, the right password too waits, until the minute is over
    braked = Browser(live_url).post("/login", {"email": "guessed@example.com", "password": PASSWORD})
    assert (braked.status_code, error_code(braked)) == (429, "too_many_attempts")
    assert int(braked.headers["retry-after"]) == 60
    assert logged_in(live_url, "bystander@example.com")  # another account, same address
    assert owner.post("/login", {"email": "guessed@example.com", "password": PASSWORD}).status_code == 200

    # the next step: 5 more failures, and the wait is the rest of the quarter hour
    now[0] += 61
    for _ in range(5):
        assert stranger_guesses(live_url, "guessed@example.com").status_code == 401
    braked = Browser(live_url).post("/login", {"email": "guessed@example.com", "password": PASSWORD})
    assert (braked.status_code, int(braked.headers["retry-after"])) == (429, 15 * 60 - 61)
    now[0] += 15 * 60
    assert logged_in(live_url, "guessed@example.com")

    # per address: 10 failures a minute, whatever the emails, brake every stranger's log-in from there
    now[0] += 60 * 60
    for attempt in range(10):
        Browser(live_url).post("/login", {"email": f"spray{attempt}@example.com", "password": "guess"})
    braked = Browser(live_url).post("/login", {"email": "bystander@example.com", "password": PASSWORD})
    assert braked.status_code == 429 and "retry-after" in braked.headers
    assert owner.post("/login", {"email": "guessed@example.com", "password": PASSWORD}).status_code == 200


def test_wrong_confirmations_are_braked_like_log_ins(live_url):
    browser = signed_up(live_url, "confirm@example.com")
    answers = [browser.delete("", {"password": "not my password"}) for _ in range(6)]
    assert [answer.status_code for answer in answers] == [400] * 5 + [429]
    refused = browser.post("/password", {"current_password": PASSWORD, "new_password": "new password 1"})
    assert (refused.status_code, error_code(refused)) == (429, "too_many_attempts")
    assert browser.get("/me").status_code == 200  # braked, not logged out


def test_a_login_rehashes_a_password_hashed_with_older_parameters(live_url, api_db):
    signed_up(live_url, "rehash@example.com")
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(PASSWORD)
    with api_db() as db:
        db.execute(text("UPDATE accounts SET password_hash = :hash WHERE email = 'rehash@example.com'"),
                   {"hash": weak})
        db.commit()
    logged_in(live_url, "rehash@example.com")
    with api_db() as db:
        stored = db.scalar(select(Account.password_hash).where(Account.email == "rehash@example.com"))
    assert stored != weak and "m=19456,t=2,p=1" in stored
    assert logged_in(live_url, "rehash@example.com")


# CSRF

@pytest.mark.parametrize("header", [None, "wrong"])
def test_state_changing_requests_need_the_csrf_header(live_url, header):
    browser = signed_up(live_url, f"csrf-{header}@example.com")
    key_id = browser.post("/keys", {"name": "k"}).json()["key"]["id"]
    headers = {} if header is None else {"X-CSRF-Token": header}
    attempts = [browser.post("/keys", {"name": "k2"}, csrf=False, headers=headers),
                browser.patch(f"/keys/{key_id}", {"is_enabled": False}, csrf=False, headers=headers),
                browser.delete(f"/keys/{key_id}", csrf=False, headers=headers),
                browser.post("/password", {"current_password": PASSWORD, "new_password": "x" * 10},
                             csrf=False, headers=headers),
                browser.delete("", {"password": PASSWORD}, csrf=False, headers=headers),
                browser.post("/logout", csrf=False, headers=headers)]
    assert [(response.status_code, error_code(response)) for response in attempts] == [(403, "csrf_failed")] * 6
    [key] = browser.get("/keys").json()["data"]  # nothing changed
    assert (key["id"], key["is_enabled"]) == (key_id, True)
    assert browser.get("/me").status_code == 200


# passwords and the account

def test_a_password_change_ends_the_other_sessions(live_url):
    here = signed_up(live_url, "change@example.com")
    elsewhere = logged_in(live_url, "change@example.com")
    wrong = here.post("/password", {"current_password": "not it at all", "new_password": "new password 1"})
    assert (wrong.status_code, error_code(wrong)) == (400, "wrong_password")
    weak = here.post("/password", {"current_password": PASSWORD, "new_password": "short"})
    assert (weak.status_code, error_code(weak)) == (400, "weak_password")
    assert elsewhere.get("/me").status_code == 200
    assert here.post("/password", {"current_password": PASSWORD, "new_password": "new password 1"}).status_code == 204
    assert here.get("/me").status_code == 200
    assert error_code(elsewhere.get("/me")) == "not_logged_in"
    assert Browser(live_url).post("/login", {"email": "change@example.com", "password": PASSWORD}).status_code == 401
    assert logged_in(live_url, "change@example.com", "new password 1")


def test_deleting_the_account_stops_its_keys_at_once_and_keeps_its_usage(live_url, app, api_db):
    browser = signed_up(live_url, "leaving@example.com")
    secret = browser.post("/keys", {"name": "doomed"}).json()["secret"]
    assert chat_status(live_url, secret) == 200
    wrong = browser.delete("", {"password": "not my password"})
    assert (wrong.status_code, error_code(wrong)) == (400, "wrong_password")
    assert chat_status(live_url, secret) == 200
    assert browser.delete("", {"password": PASSWORD}).status_code == 204
    assert chat_status(live_url, secret) == 401
    assert browser.get("/me").status_code == 401
    assert Browser(live_url).post("/login", {"email": "leaving@example.com", "password": PASSWORD}).status_code == 401
    assert app.state.serving.usage.flush()
    with api_db() as db:
        assert db.scalar(select(Account).where(Account.email == "leaving@example.com")) is None
        orphans = db.scalars(select(Usage).where(Usage.account_id.is_(None), Usage.key_id.is_(None))).all()
    assert len(orphans) >= 2


# keys

def test_keys_are_created_listed_changed_and_deleted_with_their_limits(live_url):
    browser = signed_up(live_url, "keys@example.com")
    limits = {"requests_per_minute": 5, "tokens_per_minute": None, "token_budget": 1000, "budget_period": "day"}
    created = browser.post("/keys", {"name": "  ci  ", "limits": limits})
    assert created.status_code == 201
    key, secret = created.json()["key"], created.json()["secret"]
    assert secret.startswith("msk-") and secret[4:].startswith(key["prefix"])
    assert (key["name"], key["is_enabled"], key["limits"], key["last_used_at"]) == ("ci", True, limits, None)
    assert key["usage"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert browser.get("/keys").json()["data"] == [key]

    changed = browser.patch(f"/keys/{key['id']}", {"name": "ci-2", "is_enabled": False, "limits": {}})
    assert changed.status_code == 200
    unlimited = dict.fromkeys(limits)
    assert (changed.json()["name"], changed.json()["is_enabled"], changed.json()["limits"]) == (
        "ci-2", False, unlimited)
    for body in ({"limits": {"token_budget": 10}}, {"limits": {"requests_per_minute": 0}}, {"name": ""},
                 {"is_enabled": "yes"}, {"colour": "red"}):
        response = browser.patch(f"/keys/{key['id']}", body)
        assert response.status_code == 400, body
    assert browser.post("/keys", {"name": "x" * 101}).status_code == 400
    assert browser.delete(f"/keys/{key['id']}").status_code == 204
    assert browser.get("/keys").json()["data"] == []
    for key_id in (key["id"], "abc", "99999999999", "0"):
        response = browser.patch(f"/keys/{key_id}", {"is_enabled": True})
        assert (response.status_code, error_code(response)) == (404, "key_not_found")


def test_another_account_can_neither_see_nor_change_nor_delete_a_key_or_its_usage(live_url, app):
    owner = signed_up(live_url, "owner@example.com")
    key = owner.post("/keys", {"name": "mine"}).json()
    assert chat_status(live_url, key["secret"]) == 200
    assert app.state.serving.usage.flush()
    key_id = key["key"]["id"]
    other = signed_up(live_url, "other@example.com")
    assert other.get("/keys").json()["data"] == []
    for by in ("day", "key", "model"):
        assert other.get("/usage", params={"by": by}).json()["data"] == []
    unknown = other.patch("/keys/999999", {"is_enabled": False})
    for response in (other.patch(f"/keys/{key_id}", {"is_enabled": False}),
                     other.patch(f"/keys/{key_id}", {"name": "stolen"}),
                     other.delete(f"/keys/{key_id}")):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == unknown.json()["error"]["type"]
        assert error_code(response) == error_code(unknown)
    [mine] = owner.get("/keys").json()["data"]
    assert (mine["name"], mine["is_enabled"], mine["usage"]["requests"]) == ("mine", True, 1)
    assert chat_status(live_url, key["secret"]) == 200


def test_logged_out_requests_get_401(live_url):
    anonymous = Browser(live_url)
    for response in (anonymous.get("/me"), anonymous.get("/keys"), anonymous.get("/usage")):
        assert (response.status_code, error_code(response)) == (401, "not_logged_in")
    forged = httpx.get(live_url + "/api/account/keys", cookies={"msv_session": "forged"})
    assert forged.status_code == 401


def test_the_usage_range_and_grouping_are_checked(live_url):
    browser = signed_up(live_url, "range@example.com")
    assert browser.get("/usage", params={"since": "2025-02-01", "until": "2025-01-01"}).status_code == 400
    assert browser.get("/usage", params={"since": "yesterday"}).status_code == 400
    assert browser.get("/usage", params={"by": "hour"}).status_code == 400
    assert browser.get("/usage", params={"since": "2025-01-01", "until": "2025-01-31"}).json() == {"data": []}


def test_the_account_api_is_documented(live_url):
    spec = httpx.get(live_url + "/openapi.json").json()
    paths = {path: methods for path, methods in spec["paths"].items() if path.startswith("/api/account")}
    assert set(paths) == {"/api/account/signup", "/api/account/login", "/api/account/logout",
                          "/api/account/me", "/api/account/password", "/api/account",
                          "/api/account/keys", "/api/account/keys/{key_id}", "/api/account/usage"}
    assert all(operation["tags"] == ["account"] for methods in paths.values() for operation in methods.values())
