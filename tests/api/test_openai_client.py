"""The official openai client, sync and async, against a real uvicorn, under both base URLs; and every
object the server sends, for every kind of request, checked against OpenAI's published schema."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.api.conftest import MODEL_ID, bearer, chat, sse_events

STYLES = [("/v1", MODEL_ID), ("/api/ai", "open-mistral-7b")]
HELLO = [{"role": "user", "content": "Hello"}]
NO_EOS = {0: -100}  # the byte tokenizer's EOS never ends a reply early: replies are exactly max_tokens long
MAX_TOKENS = 6

# what each kind of request adds to the plain one
KINDS = {
    "plain": {},
    "stream": {"stream": True},
    "stream with usage": {"stream": True, "stream_options": {"include_usage": True}},
    "n=2": {"n": 2, "seed": 1},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
}


def request(model: str, kind: str) -> dict:
    return dict(model=model, messages=HELLO, max_tokens=MAX_TOKENS, temperature=0, logit_bias=NO_EOS, **KINDS[kind])


def check(kind: str, result) -> None:
    """What the client made of the reply: a ChatCompletion, or the list of chunks of a stream."""
    if kind.startswith("stream"):
        chunks = result
        content = [c for c in chunks if c.choices]
        assert content[0].choices[0].delta.role == "assistant"
        assert content[-1].choices[0].finish_reason == "length"
        text = "".join(c.choices[0].delta.content or "" for c in content)
        assert text
        if kind == "stream with usage":
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
            assert all(c.usage is None for c in chunks[:-1])
        else:
            assert all(c.usage is None for c in chunks)
        return
    completion = result
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    n = 2 if kind == "n=2" else 1
    assert [choice.index for choice in completion.choices] == list(range(n))
    for choice in completion.choices:
        assert choice.finish_reason == "length" and choice.message.role == "assistant"
        assert choice.message.tool_calls in ([], None)
        if kind == "logprobs":
            entries = choice.logprobs.content
            assert len(entries) == MAX_TOKENS and all(len(entry.top_logprobs) == 2 for entry in entries)
        else:
            assert choice.logprobs is None
    assert completion.usage.completion_tokens == n * MAX_TOKENS
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + n * MAX_TOKENS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path, model", STYLES)
def test_the_sync_client(live_url, api_key, path, model, kind):
    client = openai.OpenAI(base_url=live_url + path, api_key=api_key, max_retries=0)
    result = client.chat.completions.create(**request(model, kind))
    check(kind, list(result) if kind.startswith("stream") else result)
    client.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path, model", STYLES)
def test_the_async_client(live_url, api_key, path, model, kind):
    async def main():
        async with openai.AsyncOpenAI(base_url=live_url + path, api_key=api_key, max_retries=0) as client:
            result = await client.chat.completions.create(**request(model, kind))
            if kind.startswith("stream"):
                return [chunk async for chunk in result]
            return result
    check(kind, asyncio.run(main()))


@pytest.mark.parametrize("path, model", STYLES)
def test_the_sync_and_async_clients_agree_with_each_other_and_with_streaming(live_url, api_key, path, model):
    sync = openai.OpenAI(base_url=live_url + path, api_key=api_key, max_retries=0)
    plain = sync.chat.completions.create(**request(model, "plain")).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       sync.chat.completions.create(**request(model, "stream with usage")) if c.choices)

    async def asynchronous():
        async with openai.AsyncOpenAI(base_url=live_url + path, api_key=api_key, max_retries=0) as client:
            return (await client.chat.completions.create(**request(model, "plain"))).choices[0].message.content
    assert plain == streamed == asyncio.run(asynchronous())
    assert [m.id for m in sync.models.list()] == [MODEL_ID, "open-mistral-7b"]
    assert sync.models.retrieve(model).id == model
    sync.close()


@pytest.mark.parametrize("path, model", STYLES)
def test_errors_reach_the_client_as_its_own_exceptions(live_url, api_key, path, model):
    client = openai.OpenAI(base_url=live_url + path, api_key=api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=HELLO, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_url + path, api_key="msk-wrong", max_retries=0).chat.completions.create(
            model=model, messages=HELLO)
    client.close()


# OpenAI's schema, object by object, for every kind of request (streams of n=2 and logprobs included)

SCHEMA_KINDS = {**KINDS, "stream, n=2": {"stream": True, "n": 2, "seed": 1},
                "stream, logprobs": {"stream": True, "logprobs": True, "top_logprobs": 2},
                "n=2, logprobs": {"n": 2, "seed": 1, "logprobs": True, "top_logprobs": 3}}


@pytest.mark.parametrize("kind", SCHEMA_KINDS)
def test_every_reply_and_chunk_validates_against_openais_schema(live_url, api_key, openai_schema, kind):
    body = chat(max_tokens=MAX_TOKENS, logit_bias={"0": -100}, **SCHEMA_KINDS[kind])
    response = httpx.post(live_url + "/v1/chat/completions", json=body, headers=bearer(api_key), timeout=60)
    assert response.status_code == 200
    n = body.get("n", 1)
    if not body.get("stream"):
        reply = response.json()
        openai_schema("CreateChatCompletionResponse", reply)
        assert len(reply["choices"]) == n
        return
    *chunks, done = sse_events(response.text)
    assert done == "[DONE]"
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
    finished = [choice["index"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert sorted(finished) == list(range(n))
    if body.get("logprobs"):
        entries = [entry for chunk in chunks for choice in chunk["choices"] if choice.get("logprobs")
                   for entry in choice["logprobs"]["content"]]
        assert len(entries) == n * MAX_TOKENS
