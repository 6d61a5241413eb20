"""What several API test modules share: the dashboard's browser (an operator's too), a slow engine, the
bodies that fail validation, and a clock the rate limiter can be given."""

from __future__ import annotations

import time

import httpx

from mistral_serve.db import crud
from mistral_serve.engine.engine import LLMEngine
from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, chat

PASSWORD = "correct horse battery"


class Browser:
    """One browser: its own cookie jar, and the CSRF header on every state-changing request, as the
    dashboard's pages send it (`csrf=False` leaves it out). Paths are under `prefix`."""

    def __init__(self, base_url: str, prefix: str = "/api/account", http: httpx.Client | None = None):
        self.http = http or httpx.Client(base_url=base_url, timeout=30)
        self.prefix = prefix

    @property
    def admin(self) -> Browser:
        """The same browser, its paths under /api/admin: the operator's API."""
        return Browser(str(self.http.base_url), "/api/admin", self.http)

    def request(self, method: str, path: str, *, csrf: bool = True, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if csrf and method != "GET" and "msv_csrf" in self.http.cookies:
            headers = {"X-CSRF-Token": self.http.cookies["msv_csrf"], **headers}
        return self.http.request(method, self.prefix + path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        return self.request("POST", path, json=body, **kwargs)

    def patch(self, path: str, body: dict, **kwargs) -> httpx.Response:
        return self.request("PATCH", path, json=body, **kwargs)

    def delete(self, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        return self.request("DELETE", path, json=body, **kwargs)


def signed_up(base_url: str, email: str, password: str = PASSWORD) -> Browser:
    """A browser logged in to a new account, as the dashboard gets there: sign up, then log in."""
    browser = Browser(base_url)
    response = browser.post("/signup", {"email": email, "password": password})
    assert response.status_code == 202, response.text
    response = browser.post("/login", {"email": email, "password": password})
    assert response.status_code == 200, response.text
    return browser


def operator(base_url: str, db, email: str) -> Browser:
    """A browser logged in to a new operator's account (operators are made from the command line)."""
    with db() as session:
        crud.create_account(session, email, PASSWORD, is_admin=True)
    browser = Browser(base_url)
    response = browser.post("/login", {"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return browser


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


class SlowEngine(LLMEngine):
    """The tiny model at the pace of a big one: 20 ms a step, so a long request keeps its place."""

    def step(self):
        time.sleep(0.02)
        return super().step()


USER = [{"role": "user", "content": "Hi"}]
# (what, body, status, param): the body is a dict (sent as JSON) or raw bytes
BAD_REQUESTS = [
    ("no body", b"", 400, None),
    ("not JSON", b"{model: x}", 400, None),
    ("truncated JSON", b'{"model": "x", "messages": [', 400, None),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "messages": []}', 400, None),
    ("a JSON array", b"[1, 2]", 400, None),
    ("a JSON string", b'"hello"', 400, None),
    ("NaN temperature", b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400,
     "temperature"),
    ("no model", {"messages": USER}, 400, "model"),
    ("no messages", {"model": MODEL_ID}, 400, "messages"),
    ("empty messages", chat(messages=[]), 400, "messages"),
    ("messages not a list", chat(messages="Hi"), 400, "messages"),
    ("a message not an object", chat(messages=["Hi"]), 400, "messages.0"),
    ("unknown role", chat(messages=[{"role": "bot", "content": "Hi"}]), 400, "messages.0"),
    ("no role", chat(messages=[{"content": "Hi"}]), 400, "messages.0"),
    ("user without content", chat(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("content a number", chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("image part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages.0.content.0.type"),
    ("tool message without id", chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.tool_call_id"),
    ("unknown message field", chat(messages=[{"role": "user", "content": "a", "mood": "x"}]), 400,
     "messages.0.mood"),
    ("assistant last (template refuses)", chat(messages=[{"role": "assistant", "content": "Hi"}]), 400, "messages"),
    ("model a number", chat(model=7), 400, "model"),
    ("temperature a string", chat(temperature="hot"), 400, "temperature"),
    ("temperature too high", chat(temperature=2.5), 400, "temperature"),
    ("temperature negative", chat(temperature=-1), 400, "temperature"),
    ("temperature huge", b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": 1e999}',
     400, "temperature"),
    ("top_p above 1", chat(top_p=1.5), 400, "top_p"),
    ("max_tokens zero", chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens a float", chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens a string", chat(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens beyond the context", chat(max_tokens=CONTEXT_LENGTH), 400, "max_tokens"),
    ("max_tokens huge", chat(max_tokens=10**30), 400, "max_tokens"),
    ("both token limits", chat(max_tokens=5, max_completion_tokens=6), 400, None),
    ("prompt beyond the context", chat(messages=[{"role": "user", "content": "x" * CONTEXT_LENGTH}]), 400,
     "messages"),
    ("n zero", chat(n=0), 400, "n"),
    ("n huge", chat(n=10**6), 400, "n"),
    ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop string", chat(stop=[""]), 400, "stop.0"),
    ("stop a number", chat(stop=5), 400, "stop"),
    ("seed a string", chat(seed="42"), 400, "seed"),
    ("seed beyond 64 bits", chat(seed=2**70), 400, "seed"),
    ("presence_penalty too low", chat(presence_penalty=-3), 400, "presence_penalty"),
    ("frequency_penalty too high", chat(frequency_penalty=3), 400, "frequency_penalty"),
    ("logit_bias key not an id", chat(logit_bias={"hello": 1}), 400, "logit_bias.hello.[key]"),
    ("logit_bias value too big", chat(logit_bias={"5": 1000}), 400, "logit_bias.5"),
    ("logit_bias id outside the vocabulary", chat(logit_bias={"99999": 1}), 400, "logit_bias"),
    ("logprobs a string", chat(logprobs="yes"), 400, "logprobs"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), 400, None),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("stream a string", chat(stream="true"), 400, "stream"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}), 400, None),
    ("stream_options unknown field", chat(stream=True, stream_options={"fast": True}), 400, "stream_options.fast"),
    ("top_k below -1", chat(top_k=-5), 400, "top_k"),
    ("min_p above 1", chat(min_p=2), 400, "min_p"),
    ("repetition_penalty zero", chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("user a number", chat(user=5), 400, "user"),
    ("tools to a model without tool support", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tools"),
    ("tool_choice without tools", chat(tool_choice="auto"), 400, "tool_choice"),
    ("unknown response_format", chat(response_format={"type": "xml"}), 400, "response_format"),
    ("response_format schema the grammar cannot enforce", chat(response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {"type": "string"}}}}), 400,
     "response_format"),
    ("unknown field", chat(temprature=0.5), 400, "temprature"),
    ("unknown model", chat(model="gpt-4o"), 404, "model"),
]


WINDOW_START = 1_800_000_000 // 60 * 60  # a minute's first second


class FakeClock:
    def __init__(self, now: float = WINDOW_START + 10):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
