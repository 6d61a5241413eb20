"""The operator's API under /api/admin, over real HTTP with a cookie jar per browser: only operators get
in; accounts with their usage, plans, invitations; disabling accounts and keys, ceilings; and what an
owner can no longer undo or exceed on the dashboard's own routes."""

from __future__ import annotations

from datetime import datetime, timedelta
import uuid

import fastapi.routing
import httpx
import pytest

from mistral_serve.db import crud, invites, plans
from mistral_serve.db.crud import UsageRecord
from mistral_serve.db.models import utcnow
from mistral_serve.db.plans import PlanLimits
from tests.api.conftest import MODEL_ID, bearer, chat
from tests.api.helpers import PASSWORD, Browser, error_code, operator, signed_up
from tests.conftest import DATABASE_BACKENDS

API_DB_BACKENDS = DATABASE_BACKENDS
pytestmark = pytest.mark.usefixtures("fresh_throttle")  # the tests all log in from the same address


def ask(base_url: str, secret: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(secret), timeout=60)


def account_row(admin: Browser, email: str) -> dict:
    [row] = [row for row in admin.get("/accounts").json()["data"] if row["email"] == email]
    return row


# who gets in

def admin_routes(app) -> list[tuple[str, str]]:
    routes = getattr(fastapi.routing, "iter_route_contexts", iter)(app.routes)
    return sorted({(method, route.path) for route in routes for method in getattr(route, "methods", None) or ()
                   if route.path.startswith("/api/admin") and method != "HEAD"})


def test_only_an_operators_session_gets_in_and_changes_need_the_csrf_header(live_url, app, api_db):
    boss = operator(live_url, api_db, "boss.gate@example.com")
    user = signed_up(live_url, "user.gate@example.com")
    user_key = user.post("/keys", {"name": "k"}).json()["key"]["id"]
    user_id = account_row(boss.admin, "user.gate@example.com")["id"]
    bodies = {("POST", "/api/admin/plans"): {"name": "gate-2"}, ("PATCH", "/api/admin/plans/{name:path}"): {},
              ("PATCH", "/api/admin/accounts/{account_id}"): {}, ("PATCH", "/api/admin/keys/{key_id}"): {},
              ("POST", "/api/admin/invites"): {}, ("DELETE", "/api/admin/plans/{name:path}"): None}
    routes = admin_routes(app)
    assert {path for _, path in routes} >= {"/api/admin/accounts", "/api/admin/accounts/{account_id}",
                                            "/api/admin/accounts/{account_id}/keys", "/api/admin/keys/{key_id}",
                                            "/api/admin/plans", "/api/admin/plans/{name:path}", "/api/admin/invites"}
    for method, path in routes:
        url = (path.removeprefix("/api/admin").replace("{account_id}", str(user_id))
               .replace("{key_id}", str(user_key)).replace("{name:path}", "gate"))
        body = {"json": bodies.get((method, path))} if method != "GET" else {}
        anonymous = Browser(live_url).admin.request(method, url, **body)
        assert (anonymous.status_code, error_code(anonymous)) == (401, "not_logged_in"), path
        refused = user.admin.request(method, url, **body)
        assert (refused.status_code, error_code(refused)) == (403, "not_an_operator"), path
        if method != "GET":
            forged = boss.admin.request(method, url, csrf=False, **body)
            assert (forged.status_code, error_code(forged)) == (403, "csrf_failed"), path
        boss.admin.post("/plans", {"name": "gate"})  # again, once the DELETE took it
        allowed = boss.admin.request(method, url, **body)
        assert allowed.status_code in (200, 201, 204), (path, allowed.text)
    assert user.get("/me").json()["is_admin"] is False and boss.get("/me").json()["is_admin"] is True


# accounts

def test_the_accounts_list_shows_every_account_with_its_keys_plan_and_usage(live_url, app, api_db):
    boss = operator(live_url, api_db, "boss.list@example.com")
    user = signed_up(live_url, "user.list@example.com")
    secret = user.post("/keys", {"name": "busy"}).json()["secret"]
    user.post("/keys", {"name": "idle"})
    answers = [ask(live_url, secret).json() for _ in range(2)]
    assert app.state.serving.usage.flush()
    with api_db() as db:  # a request of two months ago counts for all time only
        key = crud.find_key_by_raw(db, secret)
        crud.record_usage_batch(db, [UsageRecord(
            request_id=f"chatcmpl-{uuid.uuid4().hex}", key_id=key.id, account_id=key.account_id, model=MODEL_ID,
            status="ok", http_status=200, duration_ms=5, prompt_tokens=100, completion_tokens=50,
            created_at=utcnow() - timedelta(days=60))])
    listed = boss.admin.get("/accounts")
    assert listed.status_code == 200
    recent_tokens = sum(answer["usage"]["total_tokens"] for answer in answers)
    row = account_row(boss.admin, "user.list@example.com")
    assert {name: row[name] for name in ("is_admin", "is_enabled", "disabled_reason", "is_self_registered",
                                         "plan", "num_keys")} == {
        "is_admin": False, "is_enabled": True, "disabled_reason": None, "is_self_registered": True, "plan": None,
        "num_keys": 2}
    assert row["usage"] == {"last_30_days": {"requests": 2, "tokens": recent_tokens},
                            "all_time": {"requests": 3, "tokens": recent_tokens + 150}}
    assert account_row(boss.admin, "boss.list@example.com")["is_admin"] is True
    emails = [row["email"] for row in listed.json()["data"]]
    assert emails.index("boss.list@example.com") < emails.index("user.list@example.com")  # oldest first
    assert "$argon2" not in listed.text and "password" not in listed.text and secret not in listed.text


def test_a_disabled_account_is_refused_at_its_next_request_and_log_in_with_the_reason(live_url, api_db):
    boss = operator(live_url, api_db, "boss.disable@example.com")
    user = signed_up(live_url, "user.disable@example.com")
    secret = user.post("/keys", {"name": "k"}).json()["secret"]
    assert ask(live_url, secret).status_code == 200
    user_id = account_row(boss.admin, "user.disable@example.com")["id"]

    changed = boss.admin.patch(f"/accounts/{user_id}", {"is_enabled": False, "disabled_reason": "unpaid invoice"})
    assert changed.status_code == 200
    assert (changed.json()["is_enabled"], changed.json()["disabled_reason"]) == (False, "unpaid invoice")
    refused = ask(live_url, secret)
    assert (refused.status_code, error_code(refused)) == (401, "invalid_api_key")
    assert "unpaid invoice" in refused.json()["error"]["message"]
    assert error_code(user.get("/keys")) == "not_logged_in"  # its session ends too
    login = Browser(live_url).post("/login", {"email": "user.disable@example.com", "password": PASSWORD})
    assert (login.status_code, error_code(login)) == (403, "account_disabled")
    assert "unpaid invoice" in login.json()["error"]["message"]

    enabled = boss.admin.patch(f"/accounts/{user_id}", {"is_enabled": True})
    assert (enabled.json()["is_enabled"], enabled.json()["disabled_reason"]) == (True, None)
    assert ask(live_url, secret).status_code == 200
    for body in ({"disabled_reason": "no state change"}, {"is_enabled": "no"}, {"colour": "red"},
                 {"is_enabled": False, "disabled_reason": "x" * 201}, {"plan": "no such plan"}):
        response = boss.admin.patch(f"/accounts/{user_id}", body)
        assert response.status_code == 400, body
    assert account_row(boss.admin, "user.disable@example.com")["is_enabled"] is True  # nothing half done
    for account_id in ("999999", "abc", "0"):
        response = boss.admin.patch(f"/accounts/{account_id}", {"is_enabled": False})
        assert (response.status_code, error_code(response)) == (404, "account_not_found")


def test_an_operator_cannot_disable_or_demote_themself_but_another_operator_can(live_url, api_db):
    boss = operator(live_url, api_db, "boss.self@example.com")
    boss_id = account_row(boss.admin, "boss.self@example.com")["id"]
    for body, code in (({"is_enabled": False}, "cannot_disable_self"), ({"is_admin": False}, "cannot_demote_self")):
        response = boss.admin.patch(f"/accounts/{boss_id}", body)
        assert (response.status_code, error_code(response)) == (403, code)
    deputy = signed_up(live_url, "deputy.self@example.com")
    deputy_id = account_row(boss.admin, "deputy.self@example.com")["id"]
    assert error_code(deputy.admin.get("/accounts")) == "not_an_operator"
    assert boss.admin.patch(f"/accounts/{deputy_id}", {"is_admin": True}).json()["is_admin"] is True
    assert deputy.admin.get("/accounts").status_code == 200
    assert deputy.admin.patch(f"/accounts/{boss_id}", {"is_admin": False}).json()["is_admin"] is False
    assert error_code(boss.admin.get("/accounts")) == "not_an_operator"


# plans

def test_plans_are_created_changed_made_default_assigned_and_deleted(live_url, api_db):
    boss = operator(live_url, api_db, "boss.plans@example.com")
    user = signed_up(live_url, "user.plans@example.com")
    user_id = account_row(boss.admin, "user.plans@example.com")["id"]
    limits = {"requests_per_minute": 60, "tokens_per_minute": None, "max_concurrent_requests": 2,
              "tokens_per_day": 10_000, "tokens_per_month": None, "max_keys": 3, "max_n": 2,
              "max_output_tokens": 256, "models": [MODEL_ID]}
    created = boss.admin.post("/plans", {"name": "Team plan", "limits": limits})
    assert created.status_code == 201
    assert {name: created.json()[name] for name in ("name", "is_default", "limits", "num_accounts")} == {
        "name": "Team plan", "is_default": False, "limits": limits, "num_accounts": 0}
    duplicate = boss.admin.post("/plans", {"name": " Team plan "})
    assert (duplicate.status_code, error_code(duplicate)) == (409, "plan_exists")
    for body in ({"name": ""}, {"name": "x", "limits": {"max_keys": 0}}, {"name": "x", "limits": {"models": [""]}},
                 {"name": "x", "limits": {"rpm": 5}}):
        assert boss.admin.post("/plans", body).status_code == 400, body

    assert user.get("/me").json()["plan"] is None  # no plan of its own, and no default yet
    assigned = boss.admin.patch(f"/accounts/{user_id}", {"plan": "Team plan"})
    assert assigned.json()["plan"] == "Team plan"
    assert user.get("/me").json()["plan"] == {"name": "Team plan", "limits": limits}
    changed = boss.admin.patch("/plans/Team%20plan", {"limits": {**limits, "requests_per_minute": 30}})
    assert (changed.json()["limits"]["requests_per_minute"], changed.json()["num_accounts"]) == (30, 1)
    assert user.get("/me").json()["plan"]["limits"]["requests_per_minute"] == 30

    assert boss.admin.post("/plans", {"name": "Free", "limits": {"requests_per_minute": 5},
                                      "is_default": True}).json()["is_default"] is True
    assert boss.admin.patch(f"/accounts/{user_id}", {"plan": None}).json()["plan"] is None
    assert user.get("/me").json()["plan"]["name"] == "Free"  # the default plan applies
    assert boss.admin.patch("/plans/Team%20plan", {"is_default": True}).json()["is_default"] is True
    listed = {plan["name"]: plan["is_default"] for plan in boss.admin.get("/plans").json()["data"]}
    assert (listed["Team plan"], listed["Free"]) == (True, False)
    assert user.get("/me").json()["plan"]["name"] == "Team plan"
    assert boss.admin.patch("/plans/Team%20plan", {"is_default": False}).json()["is_default"] is False
    assert user.get("/me").json()["plan"] is None

    assert boss.admin.patch(f"/accounts/{user_id}", {"plan": "Free"}).json()["plan"] == "Free"
    assert boss.admin.delete("/plans/Free").status_code == 204
    assert account_row(boss.admin, "user.plans@example.com")["plan"] is None
    for response in (boss.admin.delete("/plans/Free"), boss.admin.patch("/plans/Free", {"is_default": True})):
        assert (response.status_code, error_code(response)) == (404, "plan_not_found")


# keys: the operator's decisions, and what the owner can no longer do

def test_an_operator_disabled_key_stays_disabled_until_an_operator_enables_it(live_url, api_db):
    boss = operator(live_url, api_db, "boss.key@example.com")
    user = signed_up(live_url, "user.key@example.com")
    created = user.post("/keys", {"name": "leaky"}).json()
    key_id, secret = created["key"]["id"], created["secret"]
    user_id = account_row(boss.admin, "user.key@example.com")["id"]
    [listed] = boss.admin.get(f"/accounts/{user_id}/keys").json()["data"]
    assert (listed["id"], listed["name"], listed["is_operator_disabled"]) == (key_id, "leaky", False)
    assert secret not in boss.admin.get(f"/accounts/{user_id}/keys").text

    disabled = boss.admin.patch(f"/keys/{key_id}", {"is_enabled": False, "disabled_reason": "posted on a forum"})
    assert disabled.status_code == 200
    assert (disabled.json()["is_enabled"], disabled.json()["is_operator_disabled"]) == (False, True)
    refused = ask(live_url, secret)
    assert refused.status_code == 401 and "posted on a forum" in refused.json()["error"]["message"]
    [seen] = user.get("/keys").json()["data"]
    assert (seen["is_enabled"], seen["is_operator_disabled"], seen["disabled_reason"]) == (
        False, True, "posted on a forum")
    undo = user.patch(f"/keys/{key_id}", {"is_enabled": True})
    assert (undo.status_code, error_code(undo)) == (403, "disabled_by_operator")
    assert "posted on a forum" in undo.json()["error"]["message"]
    assert user.patch(f"/keys/{key_id}", {"name": "renamed"}).status_code == 200  # its name is still the owner's
    assert ask(live_url, secret).status_code == 401

    enabled = boss.admin.patch(f"/keys/{key_id}", {"is_enabled": True})
    assert (enabled.json()["is_enabled"], enabled.json()["is_operator_disabled"],
            enabled.json()["disabled_reason"]) == (True, False, None)
    assert ask(live_url, secret).status_code == 200
    for missing in ("999999", "x"):
        response = boss.admin.patch(f"/keys/{missing}", {"is_enabled": False})
        assert (response.status_code, error_code(response)) == (404, "key_not_found")
    assert error_code(boss.admin.get("/accounts/999999/keys")) == "account_not_found"


def test_the_owner_sets_limits_below_the_ceiling_never_above(live_url, api_db):
    boss = operator(live_url, api_db, "boss.ceiling@example.com")
    user = signed_up(live_url, "user.ceiling@example.com")
    key_id = user.post("/keys", {"name": "k", "limits": {"requests_per_minute": 50}}).json()["key"]["id"]
    ceiling = {"requests_per_minute": 10, "tokens_per_minute": None, "token_budget": 1000, "budget_period": "day"}
    set_ceiling = boss.admin.patch(f"/keys/{key_id}", {"ceiling": ceiling})
    assert set_ceiling.json()["ceiling"] == ceiling
    assert set_ceiling.json()["limits"]["requests_per_minute"] == 50  # the owner's stays: the tighter applies
    [seen] = user.get("/keys").json()["data"]
    assert seen["ceiling"] == ceiling

    for limits, named in (({"requests_per_minute": 20, "token_budget": 500, "budget_period": "day"},
                           "requests_per_minute"),
                          ({"requests_per_minute": 5}, "token_budget"),
                          ({"requests_per_minute": 5, "token_budget": 500, "budget_period": "month"}, "token_budget")):
        lifted = user.patch(f"/keys/{key_id}", {"limits": limits})
        assert (lifted.status_code, error_code(lifted)) == (403, "above_ceiling"), limits
        assert named in lifted.json()["error"]["message"]
    below = {"requests_per_minute": 5, "tokens_per_minute": 100, "token_budget": 500, "budget_period": "day"}
    lowered = user.patch(f"/keys/{key_id}", {"limits": below})
    assert (lowered.status_code, lowered.json()["limits"]) == (200, below)
    for body in ({"ceiling": {"requests_per_minute": 0}}, {"ceiling": {"token_budget": 5}},
                 {"is_enabled": True, "disabled_reason": "why"}):
        assert boss.admin.patch(f"/keys/{key_id}", body).status_code == 400, body


def test_the_owner_keeps_within_the_plan_in_keys_and_limits(live_url, api_db):
    boss = operator(live_url, api_db, "boss.quota@example.com")
    user = signed_up(live_url, "user.quota@example.com")
    assert boss.admin.post("/plans", {"name": "Small", "limits": {
        "max_keys": 2, "requests_per_minute": 30, "tokens_per_day": 1000}}).status_code == 201
    user_id = account_row(boss.admin, "user.quota@example.com")["id"]
    assert boss.admin.patch(f"/accounts/{user_id}", {"plan": "Small"}).status_code == 200

    too_fast = user.post("/keys", {"name": "fast", "limits": {"requests_per_minute": 31}})
    assert (too_fast.status_code, error_code(too_fast)) == (403, "above_plan")
    assert "requests_per_minute" in too_fast.json()["error"]["message"]
    first = user.post("/keys", {"name": "one", "limits": {"requests_per_minute": 30}})
    assert first.status_code == 201
    assert user.post("/keys", {"name": "two"}).status_code == 201  # unlimited: the plan bounds it anyway
    third = user.post("/keys", {"name": "three"})
    assert (third.status_code, error_code(third)) == (403, "max_keys_reached")
    assert [key["name"] for key in user.get("/keys").json()["data"]] == ["one", "two"]

    key_id = first.json()["key"]["id"]
    over_budget = user.patch(f"/keys/{key_id}", {"limits": {"token_budget": 2000, "budget_period": "day"}})
    assert (over_budget.status_code, error_code(over_budget)) == (403, "above_plan")
    assert "token_budget" in over_budget.json()["error"]["message"]
    within = user.patch(f"/keys/{key_id}", {"limits": {"token_budget": 500, "budget_period": "day"}})
    assert within.status_code == 200
    assert user.delete(f"/keys/{key_id}").status_code == 204
    assert user.post("/keys", {"name": "three"}).status_code == 201  # a freed place is usable again


# invitations

def test_an_invitation_shows_its_code_once_and_lists_who_used_it(live_url, api_db):
    boss = operator(live_url, api_db, "boss.invite@example.com")
    with api_db() as db:
        plans.create_plan(db, "Guests", PlanLimits(max_keys=1))
    made = boss.admin.post("/invites", {"plan": "Guests", "note": "for Ada", "expires_in_days": 3})
    assert made.status_code == 201
    code, invite = made.json()["code"], made.json()["invite"]
    assert code.startswith(invites.INVITE_PREFIX)
    assert (invite["plan"], invite["note"], invite["used_at"]) == ("Guests", "for Ada", None)
    lifetime = datetime.fromisoformat(invite["expires_at"]) - datetime.fromisoformat(invite["created_at"])
    assert lifetime == timedelta(days=3)
    listed = boss.admin.get("/invites")
    assert code not in listed.text and [row["note"] for row in listed.json()["data"]][-1] == "for Ada"

    with api_db() as db:
        account = invites.sign_up_with_invite(db, code, "ada@example.com", PASSWORD)
        account_id = account.id
    [used] = [row for row in boss.admin.get("/invites").json()["data"] if row["id"] == invite["id"]]
    assert used["used_at"] is not None and used["used_by_account_id"] == account_id
    assert account_row(boss.admin, "ada@example.com")["plan"] == "Guests"
    assert boss.admin.post("/invites", {}).json()["invite"]["plan"] is None  # the default plan
    for body, code in (({"plan": "nope"}, "plan_not_found"), ({"expires_in_days": 0}, "invalid_value"),
                       ({"expires_in_days": 366}, "invalid_value"), ({"note": "a\x00b"}, "invalid_value")):
        response = boss.admin.post("/invites", body)
        assert (response.status_code, error_code(response)) == (400, code), body


def test_the_operator_api_is_documented(live_url):
    spec = httpx.get(live_url + "/openapi.json").json()
    paths = {path: methods for path, methods in spec["paths"].items() if path.startswith("/api/admin")}
    assert set(paths) == {"/api/admin/accounts", "/api/admin/accounts/{account_id}",
                          "/api/admin/accounts/{account_id}/keys", "/api/admin/keys/{key_id}",
                          "/api/admin/plans", "/api/admin/plans/{name}", "/api/admin/invites"}
    assert all(operation["tags"] == ["admin"] for methods in paths.values() for operation in methods.values())
