"""Who may call what: every route of the app, enumerated from app.routes, against every kind of wrong
credential. A route missing from the table below fails the first test, so a new route is placed
here (and so checked) the day it is added.

- KEY: the chat routes take a Bearer API key; nothing else (no session) lets a request in.
- SESSION: the dashboard's reads take the session cookie; an API key is no session.
- CHANGE: the dashboard's writes take the session cookie and the X-CSRF-Token header.
- OPEN: signing up, logging in and out need no session (logging out needs the CSRF header).
- PUBLIC: no credential at all, and no account's data in them: health, readiness and metrics, the
  model catalog, the OpenAPI document and its pages, the web pages and their static files.
- OPERATOR: an operator's session (and the CSRF header for a change); tests/api/test_admin.py tries
  every one of them without a session, with another account's, and without the header.
"""

from __future__ import annotations

import fastapi.routing
import httpx
import pytest

from mistral_serve.api.counters import InProcessCounters
from mistral_serve.api.login_throttle import LoginThrottle
from mistral_serve.db import crud
from tests.api.conftest import MODEL_ID, bearer, chat, new_key
from tests.api.helpers import PASSWORD, Browser, error_code, signed_up

PUBLIC, KEY, SESSION, CHANGE, OPEN, OPERATOR = "public", "key", "session", "change", "open", "operator"

ROUTES = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/"): PUBLIC,
    ("GET", "/static/{path:path}"): PUBLIC,
    ("GET", "/v1/models"): PUBLIC,
    ("GET", "/v1/models/{model_id:path}"): PUBLIC,
    ("GET", "/api/ai/models"): PUBLIC,
    ("GET", "/api/ai/models/{model_id:path}"): PUBLIC,
    ("POST", "/v1/chat/completions"): KEY,
    ("POST", "/api/ai/chat/completions"): KEY,
    ("GET", "/api/account/signup"): PUBLIC,
    ("POST", "/api/account/signup"): OPEN,
    ("POST", "/api/account/login"): OPEN,
    ("POST", "/api/account/logout"): OPEN,
    ("GET", "/api/account/me"): SESSION,
    ("GET", "/api/account/keys"): SESSION,
    ("GET", "/api/account/usage"): SESSION,
    ("POST", "/api/account/password"): CHANGE,
    ("DELETE", "/api/account"): CHANGE,
    ("POST", "/api/account/keys"): CHANGE,
    ("PATCH", "/api/account/keys/{key_id}"): CHANGE,
    ("DELETE", "/api/account/keys/{key_id}"): CHANGE,
    ("GET", "/api/admin/accounts"): OPERATOR,
    ("PATCH", "/api/admin/accounts/{account_id}"): OPERATOR,
    ("GET", "/api/admin/accounts/{account_id}/keys"): OPERATOR,
    ("PATCH", "/api/admin/keys/{key_id}"): OPERATOR,
    ("GET", "/api/admin/plans"): OPERATOR,
    ("POST", "/api/admin/plans"): OPERATOR,
    ("PATCH", "/api/admin/plans/{name:path}"): OPERATOR,
    ("DELETE", "/api/admin/plans/{name:path}"): OPERATOR,
    ("GET", "/api/admin/invites"): OPERATOR,
    ("POST", "/api/admin/invites"): OPERATOR,
}
BODIES = {  # a body each route would accept from its rightful caller
    ("POST", "/v1/chat/completions"): chat(max_tokens=1),
    ("POST", "/api/ai/chat/completions"): chat(max_tokens=1),
    ("POST", "/api/account/password"): {"current_password": PASSWORD, "new_password": PASSWORD + "!"},
    ("DELETE", "/api/account"): {"password": PASSWORD},
    ("POST", "/api/account/keys"): {"name": "made by the matrix"},
    ("PATCH", "/api/account/keys/{key_id}"): {"is_enabled": False},
}


def routes_of(kind: str) -> list[tuple[str, str]]:
    return [route for route, access in ROUTES.items() if access == kind]


def url(path: str, key_id: int = 1) -> str:
    return (path.replace("{model_id:path}", MODEL_ID).replace("{path:path}", "app.js")
            .replace("{key_id}", str(key_id)))


def send(client: httpx.Client | Browser, method: str, path: str, key_id: int = 1, **kwargs) -> httpx.Response:
    http = client.http if isinstance(client, Browser) else client
    return http.request(method, url(path, key_id), json=BODIES.get((method, path)), **kwargs)


@pytest.fixture(autouse=True)
def fresh_throttle(app):
    app.state.login_throttle = LoginThrottle(InProcessCounters())


@pytest.fixture(scope="module")
def anonymous(live_url):
    with httpx.Client(base_url=live_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def owner(live_url, api_db) -> dict:
    """An account with a dashboard session, a key made there, and a request of that key in its usage."""
    browser = signed_up(live_url, "owner@example.com")
    created = browser.post("/keys", {"name": "owner's key"}).json()
    assert httpx.post(live_url + "/v1/chat/completions", json=chat(max_tokens=1), headers=bearer(created["secret"]),
                      timeout=60).status_code == 200
    return {"browser": browser, "key_id": created["key"]["id"], "secret": created["secret"],
            "prefix": created["key"]["prefix"]}


def served_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route, those of included routers too; a mount or websocket has no
    methods: "*". FastAPI from 0.16x keeps included routers whole in app.routes."""
    routes = getattr(fastapi.routing, "iter_route_contexts", iter)(app.routes)
    return {(method, route.path) for route in routes
            for method in getattr(route, "methods", None) or ("*",) if method != "HEAD"}


def test_every_route_is_in_the_table(app):
    served = served_routes(app)
    assert served == set(ROUTES), f"not in the table: {served - set(ROUTES)}; gone: {set(ROUTES) - served}"


@pytest.mark.parametrize("method, path", routes_of(PUBLIC))
def test_public_routes_answer_anyone_and_hold_no_account_data(anonymous, owner, method, path):
    response = send(anonymous, method, path)
    assert response.status_code == 200, response.text[:300]
    for secret in ("owner@example.com", owner["prefix"], owner["secret"], "owner's key"):
        assert secret not in response.text


def test_a_public_route_reveals_no_more_to_a_key_or_a_session(anonymous, owner, api_key):
    for method, path in routes_of(PUBLIC):
        if path in ("/metrics", "/ready"):  # they change between two requests
            continue
        seen = send(anonymous, method, path).content
        assert send(anonymous, method, path, headers=bearer(api_key)).content == seen, path
        assert send(owner["browser"], method, path).content == seen, path


@pytest.mark.parametrize("method, path", routes_of(KEY))
def test_the_chat_routes_take_a_good_key_and_nothing_else(anonymous, owner, api_db, method, path):
    disabled, deleted = new_key(api_db, name="disabled"), new_key(api_db, name="deleted")
    with api_db() as session:
        crud.set_key_enabled_by_operator(session, crud.find_key_by_raw(session, disabled), False)
        crud.delete_key(session, crud.find_key_by_raw(session, deleted))
    csrf = owner["browser"].http.cookies["msv_csrf"]
    refused = {
        "no key": send(anonymous, method, path),
        "a key nobody has": send(anonymous, method, path, headers=bearer("msk-" + "x" * 43)),
        "a disabled key": send(anonymous, method, path, headers=bearer(disabled)),
        "a deleted key": send(anonymous, method, path, headers=bearer(deleted)),
        "a key's prefix": send(anonymous, method, path, headers=bearer("msk-" + owner["prefix"])),
        "a dashboard session": send(owner["browser"], method, path, headers={"X-CSRF-Token": csrf}),
        "the session token as a key": send(anonymous, method, path,
                                           headers=bearer(owner["browser"].http.cookies["msv_session"])),
    }
    assert {what: (r.status_code, error_code(r)) for what, r in refused.items()} == {
        what: (401, "invalid_api_key") for what in refused}
    assert send(anonymous, method, path, headers=bearer(owner["secret"])).status_code == 200


@pytest.mark.parametrize("method, path", routes_of(SESSION) + routes_of(CHANGE))
def test_the_dashboard_routes_take_a_session_and_nothing_else(anonymous, live_url, owner, api_key, api_db,
                                                                method, path):
    name = f"{method}{path.replace('/', '.').replace('{', '').replace('}', '')}".lower()
    disabled = signed_up(live_url, f"disabled.{name}@example.com")
    with api_db() as session:
        crud.set_account_enabled(session, crud.get_account_by_email(session, f"disabled.{name}@example.com"), False)
    nobody = httpx.Client(base_url=live_url, cookies={"msv_session": "x" * 43, "msv_csrf": "y"}, timeout=60)
    refused = {
        "no session": send(anonymous, method, path),
        "a session nobody has": send(nobody, method, path, headers={"X-CSRF-Token": "y"}),
        "an API key": send(anonymous, method, path, headers=bearer(api_key)),
        "the owner's key": send(anonymous, method, path, headers=bearer(owner["secret"])),
        "a disabled account's session": send(disabled, method, path,
                                             headers={"X-CSRF-Token": disabled.http.cookies["msv_csrf"]}),
    }
    assert {what: (r.status_code, error_code(r)) for what, r in refused.items()} == {
        what: (401, "not_logged_in") for what in refused}
    if ROUTES[(method, path)] == CHANGE:  # a session without its CSRF header, or with another's
        stranger = signed_up(live_url, f"stranger.{name}@example.com")
        for headers in ({}, {"X-CSRF-Token": stranger.http.cookies["msv_csrf"]}):
            response = send(owner["browser"], method, path, key_id=owner["key_id"], headers=headers)
            assert (response.status_code, error_code(response)) == (403, "csrf_failed")


def test_another_account_sees_and_changes_nothing_of_the_owners(live_url, app, owner):
    assert app.state.serving.usage.flush()  # the owner's usage is in the database
    other = signed_up(live_url, "other@example.com")
    own = other.post("/keys", {"name": "other's key"}).json()["key"]["id"]
    for method, path in routes_of(SESSION) + routes_of(CHANGE):
        if path.endswith("{key_id}"):  # the owner's key, by its id: no such key, as if it did not exist
            response = other.request(method, url(path, owner["key_id"]).removeprefix("/api/account"),
                                     json=BODIES.get((method, path)))
            assert (response.status_code, error_code(response)) == (404, "key_not_found"), path
        elif method == "GET":
            response = other.get(url(path).removeprefix("/api/account"))
            assert response.status_code == 200
            for secret in ("owner@example.com", owner["prefix"], "owner's key", str(MODEL_ID)):
                assert secret not in response.text, (path, secret)
    assert [key["id"] for key in other.get("/keys").json()["data"]] == [own]
    [key] = owner["browser"].get("/keys").json()["data"]  # the owner's key is as it was
    assert (key["id"], key["is_enabled"]) == (owner["key_id"], True) and key["usage"]["requests"] >= 1
    assert {row["key_id"] for row in owner["browser"].get("/usage?by=key").json()["data"]} == {owner["key_id"]}


def test_logging_out_without_a_session_changes_nothing(anonymous, owner):
    with httpx.Client(base_url=anonymous.base_url, cookies={"msv_csrf": "t"}) as stranger:
        response = stranger.post("/api/account/logout", headers={"X-CSRF-Token": "t"})
    assert response.status_code == 204
    assert owner["browser"].get("/me").status_code == 200
    response = anonymous.post("/api/account/logout")
    assert (response.status_code, error_code(response)) == (403, "csrf_failed")
