"""The dashboard API under /api/account, over real HTTP with a cookie jar per browser: sessions and
their cookies, CSRF, log-in brakes, passwords, keys and usage, and one account never reaching another's."""

from __future__ import annotations

from argon2 import PasswordHasher
import httpx
import pytest
from sqlalchemy import select, text

from mistral_serve.api.counters import InProcessCounters
from mistral_serve.api.sessions import LoginThrottle
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

def test_signup_logs_in_with_httponly_lax_cookies_secure_only_over_https(live_url, api_db):
    browser = Browser(live_url)
    response = browser.post("/signup", {"email": "  Cookie@Example.COM ", "password": PASSWORD})
    assert response.status_code == 201
    assert response.json()["email"] == "cookie@example.com" and response.json()["created_at"]
    cookies = set_cookies(response)
    session, csrf = cookies["msv_session"].lower(), cookies["msv_csrf"].lower()
    assert "httponly" in session and "httponly" not in csrf
    for cookie in (session, csrf):
        assert "samesite=lax" in cookie and "path=/" in cookie and "secure" not in cookie
    assert browser.get("/me").json()["email"] == "cookie@example.com"
    # only the token's hash is stored
    token = browser.http.cookies["msv_session"]
    with api_db() as db:
        hashes = db.scalars(select(LoginSession.token_hash)).all()
    assert token not in hashes and len(hashes) >= 1

    https = Browser(live_url).post("/signup", {"email": "tls@example.com", "password": PASSWORD},
                                   headers={"X-Forwarded-Proto": "https"})
    assert https.status_code == 201
    assert all("secure" in cookie.lower() for cookie in set_cookies(https).values())


def test_signup_refuses_taken_emails_weak_passwords_and_non_addresses(live_url):
    signed_up(live_url, "taken@example.com")
    again = Browser(live_url).post("/signup", {"email": "TAKEN@example.com ", "password": PASSWORD})
    assert (again.status_code, error_code(again)) == (409, "email_taken")
    for email, password, code in [("short@example.com", "1234567", "weak_password"),
                                  ("long@example.com", "x" * 1025, "weak_password"),
                                  ("not-an-address", PASSWORD, "invalid_email")]:
        response = Browser(live_url).post("/signup", {"email": email, "password": password})
        assert (response.status_code, error_code(response)) == (400, code)
        assert "msv_session" not in response.headers.get("set-cookie", "")


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


def test_failed_logins_are_braked_per_account_and_per_address(live_url, app):
    now = [1000.0]
    app.state.login_throttle = LoginThrottle(InProcessCounters(), clock=lambda: now[0])
    signed_up(live_url, "guessed@example.com")
    signed_up(live_url, "bystander@example.com")
    for _ in range(5):
        assert Browser(live_url).post("/login", {"email": "guessed@example.com", "password": "guess"}).status_code == 401
    # the right password too is refused now, with the time to wait
    braked = Browser(live_url).post("/login", {"email": "guessed@example.com", "password": PASSWORD})
    assert (braked.status_code, error_code(braked)) == (429, "too_many_attempts")
    assert 0 < int(braked.headers["retry-after"]) <= 15 * 60
    assert logged_in(live_url, "bystander@example.com")  # another account, same address: not yet
    now[0] += 15 * 60 + 1
    assert logged_in(live_url, "guessed@example.com")

    # per address: 20 failures, whatever the emails, brake every account from there
    for attempt in range(20):
        Browser(live_url).post("/login", {"email": f"spray{attempt}@example.com", "password": "guess"})
    braked = Browser(live_url).post("/login", {"email": "bystander@example.com", "password": PASSWORD})
    assert braked.status_code == 429 and "retry-after" in braked.headers


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
