"""The smg router fixture, for real: smg in front of two fake engines (FastAPI apps under uvicorn) that
answer one fixed chat completion and record every request they get. Requests through smg reach the
engines and come back intact, streamed (usage chunk included) or not, and the token flows as the
fixture says: the engines' token is smg's key, which clients send and smg passes on."""

from __future__ import annotations

from collections.abc import Iterator
import itertools
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
import httpx
import pytest

from tests.app_server import serving as serve_in_thread
from tests.services import ServiceFailed, free_port
from tests.upstream.smg import smg_executable, smg_router

pytestmark = pytest.mark.skipif(smg_executable() is None,
                                reason="smg (the SGLang Model Gateway, the test extra's smg==1.13.0) is not installed")

MODEL = "mistral-7b-instruct"
TOKEN = "engine-token"
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
CONTENT = ["Hello", " from", " {name}"]


def completion(name: str) -> dict:
    return {"id": "chatcmpl-fixed", "object": "chat.completion", "created": 1, "model": MODEL,
            "system_fingerprint": name, "engine_only_field": [1, 2],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(CONTENT).format(name=name)},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": USAGE}


def stream_text(name: str) -> str:
    """The SSE body an engine sends: a role chunk, content chunks each with running usage (continuous
    usage stats), a finish chunk, the usage chunk and [DONE]."""
    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        return {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                "system_fingerprint": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece.format(name=name)},
                     usage={"prompt_tokens": 7, "completion_tokens": i + 1, "total_tokens": 8 + i})
               for i, piece in enumerate(CONTENT)]
    events += [chunk({}, "stop"), {**chunk({}), "choices": [], "usage": USAGE}]
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"


_ARRIVALS = itertools.count()  # orders the requests of both fake engines


def fake_engine(name: str, requests: list[dict]) -> FastAPI:
    """An engine as smg sees ours: /health open, the rest behind a Bearer token."""
    app = FastAPI()

    @app.middleware("http")
    async def record_and_authorize(request: Request, call_next):
        requests.append({"method": request.method, "path": request.url.path, "headers": dict(request.headers),
                         "body": (await request.body()).decode(), "order": next(_ARRIVALS)})
        if request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": {"message": "invalid token", "type": "invalid_request_error"}}, 401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1, "owned_by": "mistral-serve"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (await request.json()).get("stream"):
            return StreamingResponse(iter([stream_text(name)]), media_type="text/event-stream")
        return Response(json.dumps(completion(name)), media_type="application/json")

    return app


def serving(app, port: int = 0):
    """`app` under a real uvicorn on a loopback port (a free one by default), in a thread."""
    return serve_in_thread(app, port=port, log_level="warning")


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, list[dict]]]:
    """Two fake engines: their URLs, each with the requests it got."""
    recorded = {"one": [], "two": []}
    with serving(fake_engine("one", recorded["one"])) as one, serving(fake_engine("two", recorded["two"])) as two:
        yield {one: recorded["one"], two: recorded["two"]}


@pytest.fixture(scope="module")
def router(engines, tmp_path_factory) -> Iterator[str]:
    with smg_router(list(engines), worker_token=TOKEN, log_path=tmp_path_factory.mktemp("smg") / "smg.log") as url:
        yield url


def chat_body(content: str = "Hello", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def chat_requests(engines) -> list[dict]:
    """The chat requests the engines got, all of them, in the order they arrived."""
    return sorted((request for requests in engines.values() for request in requests
                   if request["path"] == "/v1/chat/completions"), key=lambda request: request["order"])


def post(url: str, body: dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/chat/completions", json=body, headers=headers, timeout=30)


def test_base_url_is_openai_style(router):
    assert router.startswith("http://127.0.0.1:") and router.endswith("/v1")
    models = httpx.get(router + "/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert [model["id"] for model in models["data"]] == [MODEL]


def test_every_engine_registered_with_the_token(router, engines):
    """smg probed each engine: /health first without a token, /v1/models with smg's key."""
    for requests in engines.values():
        probes = [request for request in requests if request["path"] == "/v1/models"]
        assert probes and all(probe["headers"].get("authorization") == f"Bearer {TOKEN}" for probe in probes)
        assert any(request["path"] == "/health" for request in requests)


def test_non_streamed_completion_comes_back_intact(router, engines):
    before = len(chat_requests(engines))
    body = chat_body("non-streamed", seed=3, max_tokens=5, top_k=4)
    response = post(router, body)
    assert response.status_code == 200, response.text
    name = response.json()["system_fingerprint"]
    assert response.content == json.dumps(completion(name)).encode()
    [forwarded] = chat_requests(engines)[before:]
    assert forwarded["headers"]["authorization"] == f"Bearer {TOKEN}"
    sent = json.loads(forwarded["body"])
    assert {key: sent[key] for key in body} == body  # smg adds defaults ("stream": false, ...), keeps the rest


def test_streamed_completion_comes_back_intact(router, engines):
    before = len(chat_requests(engines))
    body = chat_body("streamed", stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    with httpx.stream("POST", router + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    name = json.loads(text.split("\n\n")[0].removeprefix("data: "))["system_fingerprint"]
    assert text == stream_text(name)  # byte for byte: the usage chunk and [DONE] included
    [forwarded] = chat_requests(engines)[before:]
    assert json.loads(forwarded["body"])["stream_options"] == body["stream_options"]
    assert forwarded["headers"]["authorization"] == f"Bearer {TOKEN}"


def test_smg_demands_the_engines_token_of_its_clients(router, engines):
    before = len(chat_requests(engines))
    assert post(router, chat_body(), token=None).status_code == 401
    assert post(router, chat_body(), token="another-token").status_code == 401
    assert len(chat_requests(engines)) == before  # refused by smg itself


def test_round_robin_reaches_both_engines(engines, tmp_path):
    with smg_router(list(engines), policy="round_robin", worker_token=TOKEN, log_path=tmp_path / "smg.log") as url:
        served = {post(url, chat_body("same prompt")).json()["system_fingerprint"] for _ in range(4)}
    assert served == {"one", "two"}


def test_an_engine_that_comes_up_late_joins(tmp_path):
    """smg started before its engine listens: it asks again, and is ready once the engine is."""
    port, stop = free_port(), threading.Event()

    def late_engine():
        time.sleep(2)
        with serving(fake_engine("late", []), port=port):
            stop.wait(60)

    thread = threading.Thread(target=late_engine, daemon=True)
    thread.start()
    try:
        with smg_router([f"http://127.0.0.1:{port}"], worker_token=TOKEN, log_path=tmp_path / "smg.log",
                        ready_timeout_s=30) as url:
            assert post(url, chat_body()).json()["system_fingerprint"] == "late"
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_pool_that_never_gets_ready_fails_with_the_log(tmp_path):
    """An engine that is not there: smg_router raises with the tail of smg's log."""
    log = tmp_path / "smg.log"
    with pytest.raises(ServiceFailed, match=r"did not become ready(.|\n)*smg"):
        with smg_router([f"http://127.0.0.1:{free_port()}"], log_path=log, ready_timeout_s=3):
            pytest.fail("smg became ready without a worker")
    assert log.read_text(errors="replace")
