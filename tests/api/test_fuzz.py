"""Generated requests: every operation of our own OpenAPI document, fed by schemathesis with data that
fits it and data that does not, and the chat body's parser fed by Hypothesis with mutations of good
bodies. No answer is a 5xx; every error is the envelope; what the document says is what the server does.

Both are bounded (examples per operation, no deadline, no example database), so each test takes well
under a minute on a busy machine; raise FUZZ_EXAMPLES for a longer hunt."""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from mistral_serve.api.errors import APIError, from_validation_error
from mistral_serve.api.protocol import ChatCompletionRequest
from tests.api.conftest import MODEL_ID, bearer, chat
from tests.api.helpers import Browser, signed_up

NUM_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))  # per operation and mode
CHEAP = 2  # n and max_tokens are clamped to this: the tiny model answers every valid body quickly
BOUNDED = settings(max_examples=NUM_EXAMPLES, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                   suppress_health_check=list(HealthCheck))


def assert_envelope(response) -> None:
    """An error is `{"error": {"message", "type", "param", "code"}}` and nothing else."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", "")
    content_type = content_type[0] if isinstance(content_type, list) else content_type  # schemathesis': a list
    assert content_type.startswith("application/json"), response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def envelope(ctx, response, case) -> bool:
    assert_envelope(response)
    return True


CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance, negative_data_rejection,
          envelope]


@pytest.fixture(scope="module")
def schema(live_url):
    return schemathesis.openapi.from_url(live_url + "/openapi.json")


@pytest.fixture(scope="module")
def session(live_url) -> Browser:
    """A logged-in dashboard session, so that the account routes get past their 401."""
    return signed_up(live_url, "fuzz@example.com")


def credentials(case, api_key: str, session: Browser) -> dict:
    """A good key for every operation, and the session's cookies and CSRF header for all but logging out."""
    headers = bearer(api_key)
    if case.operation.path == "/api/account/logout":
        return {"headers": headers}
    cookies = dict(session.http.cookies)
    return {"headers": {**headers, "X-CSRF-Token": cookies["msv_csrf"]}, "cookies": cookies}


def cheap(case) -> None:
    if isinstance(case.body, dict):
        if case.meta and case.meta.generation.mode.is_positive and "messages" in case.body:
            # what the document cannot say: the id must be served, and a conversation ends with the user's turn
            case.body["model"] = MODEL_ID
            case.body["messages"].append({"role": "user", "content": "Hello"})
        for field in ("n", "max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and not isinstance(case.body[field], bool):
                case.body[field] = min(case.body[field], CHEAP)


def fuzz(operation, mode, base_url: str, credentials_for) -> set[int]:
    """Run `operation` on NUM_EXAMPLES generated cases, checking each answer: the statuses seen."""
    statuses = set()

    @BOUNDED
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_within_the_document(case):
        cheap(case)
        response = case.call(base_url=base_url, timeout=60, **credentials_for(case))
        statuses.add(response.status_code)
        case.validate_response(response, checks=CHECKS)
    answers_within_the_document()
    return statuses


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_every_operation_of_the_openapi_document_answers_within_it(schema, live_url, api_key, session, mode):
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/chat/completions", "POST /api/ai/chat/completions", "GET /v1/models/{model_id}",
            "POST /api/account/keys", "GET /api/account/usage"} <= labels
    statuses: dict[str, set[int]] = {label: set() for label in labels}
    for operation in operations:
        try:
            statuses[operation.label] = fuzz(operation, mode, live_url, credentials_for=lambda case: credentials(
                case, api_key, session))
        except Unsatisfiable:  # nothing to get wrong: no parameters, no body
            assert mode == schemathesis.GenerationMode.NEGATIVE and not (operation.body or operation.query)
    assert session.get("/me").status_code == 200  # the session lived through the run
    # the bodies were read and judged: not all refused at the door (no key, no session, no JSON body)
    for label in ("POST /v1/chat/completions", "POST /api/ai/chat/completions", "POST /api/account/keys"):
        assert statuses[label] - {401, 403, 415}, (label, statuses[label])


# the chat body's parser, on its own and over HTTP

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
FIELDS = sorted(ChatCompletionRequest.model_fields) + ["role", "content", "type", "text", "name", "function",
                                                        "tool_calls", "json_schema", "schema", "include_usage"]


@st.composite
def mutated_bodies(draw) -> dict:
    """A good body with a few fields set to anything, at the top or inside its first message."""
    body = chat(max_tokens=1)
    for _ in range(draw(st.integers(1, 3))):
        messages = body["messages"] if isinstance(body.get("messages"), list) else []
        is_in_message = bool(messages) and isinstance(messages[0], dict) and draw(st.booleans())
        where = messages[0] if is_in_message else body
        where[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
    return body


@BOUNDED
@given(body=mutated_bodies() | JSON_VALUES)
def test_the_parser_accepts_a_body_or_names_its_first_problem(body):
    try:
        ChatCompletionRequest.model_validate_json(json.dumps(body))
    except ValueError as error:  # pydantic's ValidationError
        api_error = from_validation_error(error)
        assert isinstance(api_error, APIError) and api_error.status_code == 400
        detail = api_error.body()["error"]
        assert detail["type"] == "invalid_request_error" and detail["message"], detail


@pytest.fixture(scope="module")
def http(live_url, api_key):
    with httpx.Client(base_url=live_url, headers=bearer(api_key), timeout=60) as client:
        yield client


def test_mutated_bodies_over_http_get_an_answer_or_the_envelope(http):
    @BOUNDED
    @given(body=mutated_bodies(), raw=st.binary(max_size=64), where=st.integers(0, 400))
    def answered(body, raw, where):
        for n in ("n", "max_tokens", "max_completion_tokens"):
            if isinstance(body.get(n), int):
                body[n] = min(body[n], CHEAP)
        text = json.dumps(body).encode()
        for content in (text, text[:where] + raw + text[where:]):  # as sent, then with bytes spliced in
            response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            assert response.status_code in (200, 400, 404), response.text[:300]
            assert_envelope(response)
    answered()
    assert http.post("/v1/chat/completions", json=chat(model=MODEL_ID, max_tokens=1)).status_code == 200


def test_every_reference_in_the_openapi_document_resolves(live_url):
    """The chat body's schema once pointed at 16 component schemas the document did not have: a
    generator saw no body at all, and schemathesis sent none."""
    document = httpx.get(live_url + "/openapi.json").json()
    references = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)))
    assert references and all(ref.startswith("#/components/schemas/") for ref in references), references
    assert {ref.rsplit("/", 1)[1] for ref in references} <= set(document["components"]["schemas"])
    chat_body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert "ChatCompletionRequest" == chat_body["schema"]["title"]
    assert schemathesis.openapi.from_dict(document)["/v1/chat/completions"]["POST"].body
