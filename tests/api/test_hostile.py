"""Hostile and malformed requests over real HTTP: each gets the documented 4xx envelope, never a 500,
and the server answers a good request right after.

test_errors.py holds the table of bodies that fail validation (one row per rule, with the `param`
named); this table is about what arrives at the socket: auth headers, methods, content types,
encodings, sizes, nesting, and values built to hurt.
"""

from __future__ import annotations

import gzip
import json

import httpx
import pytest
from sqlalchemy import select

from mistral_serve.api.app import create_app
from mistral_serve.api.middleware import MAX_BODY_BYTES
from mistral_serve.api.counters import InProcessCounters
from mistral_serve.api.login_throttle import LoginThrottle
from mistral_serve.db.migrations import upgrade_to_head
from mistral_serve.db.models import Usage
from mistral_serve.db.session import create_db_engine, create_session_factory
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import MODEL_ID, bearer, chat, new_key, serving
from tests.api.helpers import PASSWORD, Browser, error_code, signed_up
from tests.conftest import DATABASE_BACKENDS, database_url_for, drop_database_for

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
GOOD = json.dumps(chat(max_tokens=1)).encode()
TEN_MB = 10 << 20


SIGNUP = "/api/account/signup"


def raw(text: str) -> bytes:
    return text.encode()


def body(**fields) -> bytes:
    return json.dumps(chat(**fields)).encode()


def account_body(**fields) -> bytes:
    return json.dumps({"email": "hostile@example.com", "password": "correct horse battery", **fields}).encode()


def with_content(content: bytes) -> bytes:
    """A chat body whose user content is `content`, spliced in as raw JSON bytes."""
    return b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "' + content + b'"}]}'


def nested(depth: int) -> bytes:
    prefix = b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "user": '
    return prefix + b"[" * depth + b"]" * depth + b"}"


def chunked(total: int, piece: int = 1 << 20):
    """A body sent with Transfer-Encoding: chunked, so no Content-Length announces its size."""
    prefix = b'{"model": "m", "messages": [{"role": "user", "content": "'
    yield prefix
    for _ in range(total // piece):
        yield b"x" * piece
    yield b'"}]}'


# (what, method, path, headers (None: JSON), body, status); every row but the 401s also sends a good key
CASES = [
    # who is asking
    ("no Authorization header", "POST", CHAT, JSON, GOOD, 401),
    ("empty Authorization header", "POST", CHAT, {**JSON, "Authorization": ""}, GOOD, 401),
    ("Bearer with no key", "POST", CHAT, {**JSON, "Authorization": "Bearer"}, GOOD, 401),
    ("Basic auth", "POST", CHAT, {**JSON, "Authorization": "Basic dXNlcjpwYXNz"}, GOOD, 401),
    ("Token scheme", "POST", CHAT, {**JSON, "Authorization": "Token msk-abc"}, GOOD, 401),
    ("an unknown key", "POST", CHAT, {**JSON, **bearer("msk-" + "A" * 43)}, GOOD, 401),
    ("a 16 KB key", "POST", CHAT, {**JSON, **bearer("k" * 16_000)}, GOOD, 401),
    ("a key of non-ASCII bytes", "POST", CHAT, {**JSON, "Authorization": b"Bearer \xff\xfe\x80"}, GOOD, 401),
    ("missing auth on the Oxen route", "POST", "/api/ai/chat/completions", JSON, GOOD, 401),
    # methods and routes
    ("GET on the chat route", "GET", CHAT, None, b"", 405),
    ("PUT on the chat route", "PUT", CHAT, None, GOOD, 405),
    ("DELETE on the Oxen chat route", "DELETE", "/api/ai/chat/completions", None, b"", 405),
    ("POST on the model list", "POST", "/v1/models", None, GOOD, 405),
    ("an unknown route", "GET", "/v1/engines", None, b"", 404),
    # content types and encodings
    ("text/plain", "POST", CHAT, {"Content-Type": "text/plain"}, GOOD, 415),
    ("no Content-Type", "POST", CHAT, {}, GOOD, 415),
    ("a form", "POST", CHAT, {"Content-Type": "application/x-www-form-urlencoded"}, b"model=x&messages=y", 415),
    ("multipart", "POST", CHAT, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--", 415),
    ("a gzip body", "POST", CHAT, {**JSON, "Content-Encoding": "gzip"}, gzip.compress(GOOD), 400),
    ("UTF-16 JSON", "POST", CHAT, JSON, json.dumps(chat()).encode("utf-16"), 400),
    ("invalid UTF-8 in a string", "POST", CHAT, JSON, with_content(b"\xc3\x28 \xff"), 400),
    ("a UTF-8-encoded surrogate", "POST", CHAT, JSON, with_content(b"\xed\xa0\x80"), 400),
    ("a lone high surrogate escape", "POST", CHAT, JSON, with_content(rb"hi \ud83d there"), 400),
    ("a lone low surrogate escape", "POST", CHAT, JSON, with_content(rb"\udc00"), 400),
    ("a raw control character in a string", "POST", CHAT, JSON, with_content(b"a\x01b"), 400),
    ("NUL bytes", "POST", CHAT, JSON, b"\x00" * 64, 400),
    ("JSON then garbage", "POST", CHAT, JSON, GOOD + b" trailing", 400),
    ("JSON null", "POST", CHAT, JSON, b"null", 400),
    # sizes and nesting
    ("a 10 MB body", "POST", CHAT, JSON, body(messages=[{"role": "user", "content": "x" * TEN_MB}]), 413),
    ("a 10 MB body, chunked", "POST", CHAT, JSON, chunked(TEN_MB), 413),
    ("arrays nested 100,000 deep", "POST", CHAT, JSON, nested(100_000), 400),
    ("objects nested 5,000 deep", "POST", CHAT, JSON,
     b'{"model": "m", "messages": [], "user": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", 400),
    ("a number of 5,000 digits", "POST", CHAT, JSON,
     raw(json.dumps(chat())[:-1] + ', "max_tokens": 1' + "0" * 5000 + "}"), 400),
    ("n 2**63", "POST", CHAT, JSON, body(n=2**63), 400),
    ("max_tokens 2**64", "POST", CHAT, JSON, body(max_tokens=2**64), 400),
    ("max_completion_tokens a billion", "POST", CHAT, JSON, body(max_completion_tokens=10**9), 400),
    ("top_logprobs a billion", "POST", CHAT, JSON, body(logprobs=True, top_logprobs=10**9), 400),
    ("a logit_bias of 100,000 entries", "POST", CHAT, JSON, body(logit_bias={str(i): 1 for i in range(100_000)}), 400),
    ("a logit_bias of 301 entries", "POST", CHAT, JSON, body(logit_bias={str(i): 1 for i in range(301)}), 400),
    ("a seed of 400 digits", "POST", CHAT, JSON, body(seed=10**400), 400),
    ("10,000 stop strings", "POST", CHAT, JSON, body(stop=["x"] * 10_000), 400),
    ("50,000 messages beyond the context", "POST", CHAT, JSON,
     body(messages=[{"role": "user", "content": "hi"}] * 50_000), 400),
    # messages
    ("messages an object", "POST", CHAT, JSON, body(messages={"role": "user", "content": "Hi"}), 400),
    ("an empty message", "POST", CHAT, JSON, body(messages=[{}]), 400),
    ("a null message", "POST", CHAT, JSON, body(messages=[None]), 400),
    ("role in capitals", "POST", CHAT, JSON, body(messages=[{"role": "USER", "content": "Hi"}]), 400),
    ("role null", "POST", CHAT, JSON, body(messages=[{"role": None, "content": "Hi"}]), 400),
    ("role a list", "POST", CHAT, JSON, body(messages=[{"role": ["user"], "content": "Hi"}]), 400),
    ("role 'function'", "POST", CHAT, JSON, body(messages=[{"role": "function", "name": "f", "content": "x"}]), 400),
    ("content an object", "POST", CHAT, JSON, body(messages=[{"role": "user", "content": {"text": "Hi"}}]), 400),
    ("a text part without text", "POST", CHAT, JSON, body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     400),
    # model ids
    ("a model id with control characters", "POST", CHAT, JSON, body(model="mistral\u0000\u001b[31m\r\nX-Evil: 1"), 400),
    ("a model id with a NUL only", "POST", CHAT, JSON, body(model="mistral\u0000"), 400),
    ("a model id that walks up the tree", "POST", CHAT, JSON, body(model="../../../../etc/passwd"), 404),
    ("an empty model id", "POST", CHAT, JSON, body(model=""), 404),
    ("a 100 KB model id", "POST", CHAT, JSON, body(model="m" * 100_000), 404),
    ("a model path that walks up the tree", "GET", "/v1/models/..%2F..%2F..%2Fetc%2Fpasswd", None, b"", 404),
    ("a model path with a NUL", "GET", "/api/ai/models/mistralai%2F%00", None, b"", 404),
    ("a model path with control characters", "GET", "/v1/models/%1b%5b31m%0d%0a", None, b"", 404),
    # fields nobody asked for
    ("__proto__", "POST", CHAT, JSON, body(__proto__={"admin": True}), 400),
    ("an unknown field set to null", "POST", CHAT, JSON, body(temprature=None), 400),
    ("functions (not supported)", "POST", CHAT, JSON, body(functions=[{"name": "f"}]), 400),
    ("a boolean temperature", "POST", CHAT, JSON, body(temperature=True), 400),
    ("a negative logit_bias key", "POST", CHAT, JSON, body(logit_bias={"-1": 1}), 400),
    ("include_usage a string", "POST", CHAT, JSON, body(stream=True, stream_options={"include_usage": "yes"}), 400),
    # the dashboard's routes: the same bounds as the chat route
    ("a 10 MB signup", "POST", SIGNUP, JSON, account_body(password="x" * TEN_MB), 413),
    ("a 10 MB signup, chunked", "POST", SIGNUP, JSON, chunked(TEN_MB), 413),
    ("a 10 MB log-in, chunked", "POST", "/api/account/login", JSON, chunked(TEN_MB), 413),
    ("a signup nested 100,000 deep", "POST", SIGNUP, JSON, b"[" * 100_000 + b"]" * 100_000, 400),
    ("a signup of invalid UTF-8", "POST", SIGNUP, JSON, b'{"email": "\xff@example.com", "password": "x"}', 400),
    ("a signup with a lone surrogate", "POST", SIGNUP, JSON, rb'{"email": "\ud800@example.com", "password": "x"}', 400),
    ("a signup that is a list", "POST", SIGNUP, JSON, b"[]", 400),
    ("a signup as a form", "POST", SIGNUP, {"Content-Type": "application/x-www-form-urlencoded"}, b"email=a", 400),
]


@pytest.fixture(scope="module")
def http(live_url):
    with httpx.Client(base_url=live_url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("what, method, path, headers, content, status", CASES, ids=[case[0] for case in CASES])
def test_a_hostile_request_gets_the_envelope_and_the_server_answers_afterwards(
        http, api_key, what, method, path, headers, content, status):
    headers = JSON if headers is None else headers
    if status != 401:  # only the auth rows go without the good key
        headers = {**bearer(api_key), **headers}
    response = http.request(method, path, headers=headers, content=content)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert "Traceback" not in response.text and "<html" not in response.text.lower()
    good = http.post(CHAT, content=GOOD, headers={**JSON, **bearer(api_key)})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_the_table_is_big_enough_and_the_sizes_are_real():
    assert len(CASES) >= 40
    ten_mb = next(content for what, *_, content, status in CASES if what == "a 10 MB body")
    assert len(ten_mb) > TEN_MB > MAX_BODY_BYTES


# text and numbers the database cannot store: a 400 on every backend, never a 500 from PostgreSQL

@pytest.fixture(scope="module", params=DATABASE_BACKENDS)
def stored_app(request, make_engine, tmp_path_factory):
    """An app of its own on each backend, under a real uvicorn: (its URL, the app, its session factory)."""
    url = database_url_for(request.param, tmp_path_factory.mktemp("db"))
    upgrade_to_head(url)
    db = create_session_factory(create_db_engine(url))
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(make_engine())}, db)
    with serving(app) as base_url:
        yield base_url, app, db
    db.kw["bind"].dispose()
    drop_database_for(url)


def test_text_and_numbers_no_column_can_hold_get_a_400(stored_app):
    base_url, app, _ = stored_app
    app.state.login_throttle = LoginThrottle(InProcessCounters())
    nul_email = {"email": "nul\u0000@example.com", "password": PASSWORD}
    response = Browser(base_url).post("/signup", nul_email)
    assert (response.status_code, error_code(response)) == (400, "invalid_email")
    response = Browser(base_url).post("/login", nul_email)
    assert (response.status_code, error_code(response)) == (401, "invalid_credentials")

    browser = signed_up(base_url, "stored@example.com")
    key_id = browser.post("/keys", {"name": "k"}).json()["key"]["id"]
    refused = [browser.post("/keys", {"name": "a\u0000b"}), browser.patch(f"/keys/{key_id}", {"name": "\u001b[31m"}),
               browser.post("/keys", {"name": "k", "limits": {"requests_per_minute": 2**31}}),
               browser.post("/keys", {"name": "k", "limits": {"tokens_per_minute": 2**64}}),
               browser.post("/keys", {"name": "k", "limits": {"token_budget": 2**63, "budget_period": "day"}}),
               browser.patch(f"/keys/{key_id}", {"limits": {"requests_per_minute": 10**30}})]
    assert [(r.status_code, error_code(r), r.json()["error"]["param"]) for r in refused] == [
        (400, "invalid_value", "name")] * 2 + [(400, "invalid_value", "limits")] * 4
    widest = browser.post("/keys", {"name": "k", "limits": {"requests_per_minute": 2**31 - 1,
                                                             "token_budget": 2**63 - 1, "budget_period": "month"}})
    assert widest.status_code == 201 and widest.json()["key"]["limits"]["token_budget"] == 2**63 - 1
    assert [key["name"] for key in browser.get("/keys").json()["data"]] == ["k", "k"]
    # ids that are digits to str.isdigit() but no number to int()
    for key_id in ("%C2%B3", "\u0661", "\uff11"):
        response = browser.patch(f"/keys/{key_id}", {"name": "x"})
        assert (response.status_code, error_code(response)) == (404, "key_not_found")
        assert browser.delete(f"/keys/{key_id}").status_code == 404


@pytest.mark.parametrize("query", ["since=0001-01-01&until=9999-12-31", "until=0001-01-02", "since=9999-12-31&until=9999-12-31",
                                   "until=9999-12-31&by=model"])
def test_usage_at_the_ends_of_the_calendar_is_an_empty_list(stored_app, query):
    base_url, app, _ = stored_app
    app.state.login_throttle = LoginThrottle(InProcessCounters())
    browser = Browser(base_url)
    if browser.post("/login", {"email": "calendar@example.com", "password": PASSWORD}).status_code != 200:
        browser = signed_up(base_url, "calendar@example.com")
    response = browser.get(f"/usage?{query}")
    assert (response.status_code, response.json()) == (200, {"data": []})


def test_a_model_id_with_a_nul_is_refused_and_usage_rows_keep_being_written(stored_app):
    """The id a client names is stored with the request's usage row: a NUL, which PostgreSQL cannot store,
    once held back every usage row after it."""
    base_url, app, db = stored_app
    headers = bearer(new_key(db, email="nul-model@example.com"))
    refused = httpx.post(base_url + CHAT, json=chat(model="nul\u0000"), headers=headers, timeout=60)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "model")
    served = httpx.post(base_url + CHAT, json=chat(max_tokens=1), headers=headers, timeout=60)
    assert served.status_code == 200
    assert app.state.serving.usage.flush()
    with db() as session:
        assert session.scalars(select(Usage.status).where(Usage.request_id == served.json()["id"])).all() == ["ok"]
    assert httpx.get(base_url + "/ready").json()["database"] == "reachable"


@pytest.mark.parametrize("query", ["until=0.0", "since=1700000000", "until=1e9", "since=2025-1-1"])
def test_a_usage_day_is_written_as_a_day_not_as_a_unix_time(live_url, query):
    browser = signed_up(live_url, f"unix-time-{query.replace('=', '-')}@example.com")
    response = browser.get(f"/usage?{query}")
    assert (response.status_code, response.json()["error"]["type"]) == (400, "invalid_request_error")
    assert "YYYY-MM-DD" in response.json()["error"]["message"] or "date" in response.json()["error"]["message"]
