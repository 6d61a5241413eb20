"""One usage row per chat request, however it ends: the tokens it reports are the tokens the client saw."""

import httpx
from sqlalchemy import select

from mistral_serve.db.models import Usage
from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, NO_EOS, bearer, chat, sse_events, wait_until
from tests.conftest import DATABASE_BACKENDS

API_DB_BACKENDS = DATABASE_BACKENDS


def usage_row(app, api_db, request_id: str) -> Usage:
    assert app.state.serving.usage.flush()
    with api_db() as session:
        return session.scalars(select(Usage).where(Usage.request_id == request_id)).one()


def all_rows(app, api_db) -> list[Usage]:
    assert app.state.serving.usage.flush()
    with api_db() as session:
        return list(session.scalars(select(Usage).order_by(Usage.id)))


def test_a_reply_writes_a_row_with_its_usage(client, app, api_db):
    response = client.post("/v1/chat/completions", json=chat(max_tokens=6, n=2, logit_bias=NO_EOS))
    assert response.status_code == 200
    body = response.json()
    row = usage_row(app, api_db, body["id"])
    assert (row.prompt_tokens, row.completion_tokens, row.cached_prompt_tokens) == (
        body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"],
        body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert row.completion_tokens == 12
    assert (row.status, row.http_status, row.finish_reason, row.model) == ("ok", 200, "length", MODEL_ID)
    assert row.key_id is not None and row.account_id is not None
    assert 0 <= row.time_to_first_token_ms <= row.duration_ms


def test_a_stream_writes_a_row_with_the_usage_of_its_last_chunk(client, app, api_db):
    response = client.post("/api/ai/chat/completions",
                           json=chat(model="open-mistral-7b", max_tokens=5, logit_bias=NO_EOS, stream=True,
                                     stream_options={"include_usage": True}))
    events = sse_events(response.text)
    usage = events[-2]["usage"]
    row = usage_row(app, api_db, events[0]["id"])
    assert (row.prompt_tokens, row.completion_tokens, row.status, row.model) == (
        usage["prompt_tokens"], usage["completion_tokens"], "ok", "open-mistral-7b")
    assert usage["completion_tokens"] == 5


def test_refused_requests_write_rows_without_tokens(client, app, api_db):
    before = len(all_rows(app, api_db))
    # the body is understood, the conversation refused (it must end with a user message)
    assert client.post("/v1/chat/completions",
                       json=chat(messages=[{"role": "assistant", "content": "Hi"}])).status_code == 400
    assert client.post("/v1/chat/completions", json=chat(model="gpt-4o")).status_code == 404
    assert client.post("/v1/chat/completions", json=chat(), headers=bearer("msk-unknown")).status_code == 401
    # no row for a request with no valid key (no account to charge) or with a body that is not one
    assert client.post("/v1/chat/completions", json=chat(temperature=5)).status_code == 400
    rows = all_rows(app, api_db)[before:]
    assert [(row.status, row.http_status, row.model, row.prompt_tokens, row.completion_tokens)
            for row in rows] == [("error", 400, MODEL_ID, 0, 0), ("error", 404, "gpt-4o", 0, 0)]


def test_a_stream_the_client_drops_writes_an_aborted_row_with_the_tokens_generated(live_url, api_key, app,
                                                                                      api_db, engine):
    body = chat(stream=True, logit_bias=NO_EOS)  # no max_tokens: it would run to the end of the context
    with httpx.Client(timeout=30, headers=bearer(api_key)) as http:
        with http.stream("POST", live_url + "/v1/chat/completions", json=body) as response:
            lines = [line for _, line in zip(range(8), response.iter_lines())]
    assert wait_until(lambda: not engine.has_unfinished_requests(), 5)
    first = sse_events(next(line for line in lines if line.startswith("data: ")))[0]
    row = usage_row(app, api_db, first["id"])
    assert (row.status, row.http_status, row.finish_reason) == ("aborted", 499, None)
    assert 1 <= row.completion_tokens < CONTEXT_LENGTH - row.prompt_tokens
    assert row.prompt_tokens > 0


def test_a_plain_request_the_client_drops_writes_an_aborted_row_too(live_url, api_key, app, api_db, engine):
    before = len(all_rows(app, api_db))
    with httpx.Client(timeout=0.5, headers=bearer(api_key)) as http:
        try:
            http.post(live_url + "/v1/chat/completions", json=chat(logit_bias=NO_EOS))
        except httpx.ReadTimeout:
            pass
    assert wait_until(lambda: not engine.has_unfinished_requests(), 5)
    assert wait_until(lambda: len(all_rows(app, api_db)) > before, 5)
    row = all_rows(app, api_db)[-1]
    assert (row.status, row.http_status) == ("aborted", 499)
    assert 1 <= row.completion_tokens < CONTEXT_LENGTH - row.prompt_tokens
