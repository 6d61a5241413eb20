"""Issue 4's path end to end over HTTP, as the dashboard walks it: sign up → log in → create a key → chat
with it → usage shows the exact tokens → disable → 401 → enable → 200 → delete → 401; and the key's
secret appears in no response after the one that created it, nor in the database."""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
import pytest
from sqlalchemy import inspect, text

from tests.api.conftest import MODEL_ID, NO_EOS, bearer, chat
from tests.api.helpers import PASSWORD, Browser, signed_up
from tests.conftest import DATABASE_BACKENDS

API_DB_BACKENDS = DATABASE_BACKENDS
pytestmark = pytest.mark.usefixtures("fresh_throttle")  # the tests all log in from the same address


def database_text(api_db) -> str:
    """Every value of every row of every table, as one string."""
    with api_db() as db:
        tables = inspect(db.get_bind()).get_table_names()
        return "\n".join(repr(tuple(row)) for table in tables
                         for row in db.execute(text(f'SELECT * FROM "{table}"')))


def test_sign_up_create_a_key_chat_see_the_usage_and_switch_the_key_off_and_on(live_url, app, api_db):
    signed_up(live_url, "e2e@example.com").post("/logout")
    browser = Browser(live_url)
    assert browser.post("/login", {"email": "e2e@example.com", "password": PASSWORD}).status_code == 200
    assert browser.get("/me").json()["email"] == "e2e@example.com"

    created = browser.post("/keys", {"name": "e2e"})
    assert created.status_code == 201
    key_id, secret = created.json()["key"]["id"], created.json()["secret"]
    later = []  # every response after the one that showed the secret

    def call_chat() -> httpx.Response:
        response = httpx.post(live_url + "/v1/chat/completions", json=chat(max_tokens=7, logit_bias=NO_EOS),
                              headers=bearer(secret), timeout=60)
        later.append(response)
        return response

    def dashboard(method: str, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        response = browser.request(method, path, json=body, **kwargs)
        later.append(response)
        return response

    reply = call_chat()
    assert reply.status_code == 200
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] == 7 and usage["prompt_tokens"] > 0
    assert app.state.serving.usage.flush()

    today = datetime.now(timezone.utc).date().isoformat()
    expected = {"requests": 1, "failed_requests": 0, "prompt_tokens": usage["prompt_tokens"],
                "cached_prompt_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                "completion_tokens": usage["completion_tokens"]}
    assert dashboard("GET", "/usage").json() == {"data": [{"day": today, **expected}]}
    assert dashboard("GET", "/usage", params={"since": today, "until": today, "by": "key"}).json() == {
        "data": [{"key_id": key_id, "key_name": "e2e", **expected}]}
    assert dashboard("GET", "/usage", params={"by": "model"}).json() == {"data": [{"model": MODEL_ID, **expected}]}
    assert dashboard("GET", "/usage", params={"since": "2020-01-01", "until": "2020-12-31"}).json() == {"data": []}
    [listed] = dashboard("GET", "/keys").json()["data"]
    assert listed["usage"] == {"requests": 1, "prompt_tokens": usage["prompt_tokens"],
                               "completion_tokens": usage["completion_tokens"]}
    assert listed["last_used_at"] is not None

    assert dashboard("PATCH", f"/keys/{key_id}", {"is_enabled": False}).json()["is_enabled"] is False
    refused = call_chat()
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert dashboard("PATCH", f"/keys/{key_id}", {"is_enabled": True}).json()["is_enabled"] is True
    assert call_chat().status_code == 200
    assert dashboard("DELETE", f"/keys/{key_id}").status_code == 204
    assert call_chat().status_code == 401
    assert dashboard("GET", "/keys").json() == {"data": []}
    assert app.state.serving.usage.flush()
    # the deleted key's usage stays in the account's totals, without its name
    [by_key] = dashboard("GET", "/usage", params={"by": "key"}).json()["data"]
    assert (by_key["key_id"], by_key["key_name"], by_key["requests"]) == (None, None, 2)

    assert all(secret not in response.text and secret not in str(response.headers) for response in later)
    assert secret not in database_text(api_db) and secret[4:] not in database_text(api_db)
