"""Chat completions on the tiny model: OpenAI's shapes, exact usage, streams, both API styles."""

import pytest

from tests.api.conftest import CONTEXT_LENGTH, MODEL_ID, NO_EOS, ChatByteTokenizer, chat, sse_events

PREFIXES = ["/v1", "/api/ai"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_reply_has_openai_shape_and_exact_usage(client, openai_schema, prefix):
    response = client.post(f"{prefix}/chat/completions", json=chat(max_tokens=12, logit_bias=NO_EOS))
    assert response.status_code == 200
    body = response.json()
    openai_schema("CreateChatCompletionResponse", body)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL_ID
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and "tool_calls" not in choice["message"]
    prompt = ChatByteTokenizer().encode_chat([{"role": "user", "content": "Hello"}])
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == len(prompt) + 12
    assert "cached_tokens" in body["usage"]["prompt_tokens_details"]


def test_the_alias_is_served_and_echoed_back(client):
    body = client.post("/api/ai/chat/completions", json=chat(model="open-mistral-7b", max_tokens=2)).json()
    assert body["model"] == "open-mistral-7b"


def test_greedy_replies_are_repeatable_and_text_parts_equal_a_string(client):
    as_string = chat(temperature=0, max_tokens=16, logit_bias=NO_EOS)
    as_parts = chat(temperature=0, max_tokens=16, logit_bias=NO_EOS,
                    messages=[{"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                           {"type": "text", "text": "lo"}]}])
    first = client.post("/v1/chat/completions", json=as_string).json()["choices"][0]["message"]["content"]
    again = client.post("/v1/chat/completions", json=as_string).json()["choices"][0]["message"]["content"]
    parts = client.post("/v1/chat/completions", json=as_parts).json()["choices"][0]["message"]["content"]
    assert first == again == parts


def test_a_stream_adds_up_to_the_non_streamed_reply(client, openai_schema):
    body = chat(temperature=0, max_tokens=20, logit_bias=NO_EOS)
    whole = client.post("/v1/chat/completions", json=body).json()
    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
        assert chunk["id"] == chunks[0]["id"] and chunk["model"] == MODEL_ID and "usage" not in chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_include_usage_ends_the_stream_with_a_usage_chunk(client, openai_schema):
    response = client.post("/v1/chat/completions", json=chat(
        max_tokens=5, logit_bias=NO_EOS, stream=True, stream_options={"include_usage": True}))
    *chunks, done = sse_events(response.text)
    assert done == "[DONE]"
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 5


def test_n_choices_are_indexed_and_counted(client, openai_schema):
    body = client.post("/v1/chat/completions", json=chat(n=3, max_tokens=6, logit_bias=NO_EOS, seed=7)).json()
    openai_schema("CreateChatCompletionResponse", body)
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 18
    assert len({choice["message"]["content"] for choice in body["choices"]}) > 1


def test_logprobs_are_null_unless_asked_and_then_openai_shaped(client, openai_schema):
    body = client.post("/v1/chat/completions", json=chat(
        temperature=0, max_tokens=4, logit_bias=NO_EOS, logprobs=True, top_logprobs=3)).json()
    openai_schema("CreateChatCompletionResponse", body)
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == 4
    for entry in entries:
        assert len(entry["bytes"]) == 1 and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]  # greedy: the most likely token
    text_bytes = b"".join(bytes(entry["bytes"]) for entry in entries)
    assert text_bytes.decode(errors="replace") == body["choices"][0]["message"]["content"]


def test_a_stop_string_ends_the_reply_before_it(client):
    full = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=40, logit_bias=NO_EOS)).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[5:7]
    cut = client.post("/v1/chat/completions", json=chat(temperature=0, max_tokens=40, logit_bias=NO_EOS,
                                                         stop=stop)).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == text[:text.index(stop)]


def test_without_max_tokens_a_reply_may_run_to_the_end_of_the_context(client):
    prompt_text = "x" * (CONTEXT_LENGTH - 20)
    body = client.post("/v1/chat/completions", json=chat(
        messages=[{"role": "user", "content": prompt_text}], logit_bias=NO_EOS)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == CONTEXT_LENGTH


def test_sampling_extensions_are_accepted_and_honoured(client):
    body = chat(max_tokens=8, logit_bias=NO_EOS, top_k=1, min_p=0.1, repetition_penalty=1.1,
                presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, user="someone", seed=3)
    first = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    # top_k=1 is greedy whatever the temperature
    greedy = client.post("/v1/chat/completions", json={**body, "temperature": 0, "seed": 99})
    assert first.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
