"""The issue's own examples, run verbatim against real `mistral-serve serve` processes.

Two servers, each started as a user starts one: `mistral-serve serve` with no --model (the demo
model, plus the Mistral models it finds in the Hugging Face cache: here a tiny random v0.3), and
`mistral-serve serve --model mistralai/Mistral-7B-Instruct-v0.3=DIR` on a tiny random v0.3 with
Mistral's real v3 tokenizer. In the examples only the base URL, the key and (for the demo) the
model id are substituted.
"""

from __future__ import annotations

import ast

from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
import httpx
import pytest

from mistral_serve.catalog import DEMO_MODEL_ID
from tests.api.conftest import sse_events
from tests.api.examples import (
    OPENAI_STYLE, OPENAI_STYLE_STREAM, OXEN_MODEL, OXEN_STYLE, OXEN_STYLE_STREAM, run_example,
)
from tests.api.servers import TINY_CONTEXT_LENGTH, V3_MODEL_ID, mistral_serve, put_in_hf_cache

def check_reply(printed: str, model: str, openai_schema) -> dict:
    reply = ast.literal_eval(printed.strip())  # the example prints r.json(): a dict's repr
    openai_schema("CreateChatCompletionResponse", reply)
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert reply["model"] == model
    [choice] = reply["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant" and "tool_calls" not in choice["message"]
    assert isinstance(choice["message"]["content"], str)
    usage = reply["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return reply


def check_stream(printed: str, model: str, openai_schema) -> list[dict]:
    *chunks, done = sse_events("\n\n".join(printed.splitlines()))
    assert done == "[DONE]"
    for chunk in chunks:
        openai_schema("CreateChatCompletionStreamResponse", chunk)
        assert chunk["model"] == model and chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    return chunks


def prompt_tokens(tokenizer: MistralTokenizer, *messages) -> int:
    """Mistral's own count of a conversation's prompt tokens."""
    return len(tokenizer.encode_chat_completion(ChatCompletionRequest(messages=list(messages))).tokens)


@pytest.fixture(scope="module")
def v3_tokenizer(tiny_v3):
    return MistralTokenizer.from_file(str(tiny_v3 / "tokenizer.model.v3"))


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_v3):
    with mistral_serve(tmp_path_factory.mktemp("tiny-server"), "--model", f"{V3_MODEL_ID}={tiny_v3}",
                       "--kv-cache-memory-mb", "64") as server:
        yield server


@pytest.fixture(scope="module")
def default_server(tmp_path_factory, tiny_v3, demo_path):
    """`mistral-serve serve` as `make serve` runs it (no --model), on a machine whose Hugging Face
    cache holds Mistral-7B-Instruct-v0.3 (the tiny one)."""
    work_dir = tmp_path_factory.mktemp("default-server")
    put_in_hf_cache(work_dir / "hf-cache", V3_MODEL_ID, tiny_v3)
    # the one setting changed: a reply the small demo model rambles on with ends within 160 tokens,
    # not 8192 (a few seconds, not minutes, on two busy CPU cores)
    with mistral_serve(work_dir, hf_cache=work_dir / "hf-cache", settings={"max_model_len": "160"}) as server:
        yield server


# a server of the tiny v0.3 checkpoint, served as mistralai/Mistral-7B-Instruct-v0.3

def test_the_openai_style_example_runs_verbatim(tiny_server, v3_tokenizer, openai_schema):
    reply = check_reply(run_example(OPENAI_STYLE, tiny_server.url, tiny_server.key), V3_MODEL_ID, openai_schema)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens(v3_tokenizer, UserMessage(content="Hello"))
    assert reply["usage"]["total_tokens"] <= TINY_CONTEXT_LENGTH


def test_the_oxen_style_examples_run_verbatim(tiny_server, v3_tokenizer, openai_schema):
    reply = check_reply(run_example(OXEN_STYLE, tiny_server.url, tiny_server.key), "open-mistral-7b", openai_schema)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens(v3_tokenizer, UserMessage(content="Hello"))
    model = ast.literal_eval(run_example(OXEN_MODEL, tiny_server.url, tiny_server.key).strip())
    openai_schema("Model", {name: model[name] for name in ("id", "object", "created", "owned_by")})
    assert model["id"] == "open-mistral-7b" and model["owned_by"] == "mistralai"
    assert model["context_length"] == TINY_CONTEXT_LENGTH  # the checkpoint's, below the card's 32768


@pytest.mark.parametrize("example, model", [(OPENAI_STYLE_STREAM, V3_MODEL_ID),
                                            (OXEN_STYLE_STREAM, "open-mistral-7b")])
def test_the_streaming_variants_run_verbatim(tiny_server, openai_schema, example, model):
    check_stream(run_example(example, tiny_server.url, tiny_server.key), model, openai_schema)


def test_usage_is_mistral_commons_count_of_the_prompt_and_the_generated_tokens(tiny_server, v3_tokenizer):
    """The developer role is the system role: same prompt, same tokens, same reply."""
    body = {"model": V3_MODEL_ID, "temperature": 0, "max_tokens": 24, "logprobs": True,
            "messages": [{"role": "developer", "content": "Answer briefly."},
                         {"role": "user", "content": "What is the capital of France?"}]}
    headers = {"Authorization": f"Bearer {tiny_server.key}"}
    with httpx.Client(base_url=tiny_server.url, headers=headers, timeout=120) as client:
        as_developer = client.post("/v1/chat/completions", json=body).json()
        body["messages"][0]["role"] = "system"
        as_system = client.post("/v1/chat/completions", json=body).json()
        streamed = sse_events(client.post("/v1/chat/completions", json={
            **body, "n": 2, "seed": 5, "temperature": 1, "stream": True,
            "stream_options": {"include_usage": True}}).text)
    expected_prompt = prompt_tokens(v3_tokenizer, SystemMessage(content="Answer briefly."),
                                    UserMessage(content="What is the capital of France?"))
    for reply in (as_developer, as_system):
        [choice] = reply["choices"]
        generated = choice["logprobs"]["content"]  # one entry per generated token
        assert reply["usage"]["prompt_tokens"] == expected_prompt
        assert reply["usage"]["completion_tokens"] == len(generated)
        assert reply["usage"]["total_tokens"] == expected_prompt + len(generated)
    assert as_developer["choices"] == as_system["choices"]
    *chunks, done = streamed
    usage = chunks[-1]["usage"]
    tokens_per_choice = [sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks
                             if c["choices"] and c["choices"][0]["index"] == index and c["choices"][0]["logprobs"])
                         for index in (0, 1)]
    assert usage["prompt_tokens"] == expected_prompt  # the prompt is counted once, whatever n
    assert usage["completion_tokens"] == sum(tokens_per_choice) and min(tokens_per_choice) > 0


def test_a_reply_without_max_tokens_ends_within_the_context(tiny_server):
    body = {"model": V3_MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "logit_bias": {"2": -100}}
    with httpx.Client(timeout=120) as client:
        reply = client.post(tiny_server.url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {tiny_server.key}"}).json()
    assert reply["choices"][0]["finish_reason"] == "length"  # EOS (id 2) is banned: it runs to the end
    assert reply["usage"]["total_tokens"] == TINY_CONTEXT_LENGTH


# `mistral-serve serve` with no --model: the demo, and the Mistral models in the Hugging Face cache

@pytest.mark.demo
def test_the_default_server_serves_the_demo_and_the_cached_mistral(default_server):
    listing = httpx.get(default_server.url + "/v1/models").json()
    assert [model["id"] for model in listing["data"]] == [DEMO_MODEL_ID, V3_MODEL_ID, "open-mistral-7b"]


@pytest.mark.demo
def test_the_examples_run_verbatim_on_the_demo_model(default_server, openai_schema):
    url, key = default_server.url, default_server.key
    for example in (OPENAI_STYLE, OXEN_STYLE):
        reply = check_reply(run_example(example, url, key, model=DEMO_MODEL_ID), DEMO_MODEL_ID, openai_schema)
        assert reply["choices"][0]["message"]["content"].strip()
    for example in (OPENAI_STYLE_STREAM, OXEN_STYLE_STREAM):
        check_stream(run_example(example, url, key, model=DEMO_MODEL_ID), DEMO_MODEL_ID, openai_schema)
    model = ast.literal_eval(run_example(OXEN_MODEL, url, key, model=DEMO_MODEL_ID).strip())
    assert model["id"] == DEMO_MODEL_ID and model["object"] == "model"


@pytest.mark.demo
def test_the_examples_run_verbatim_on_the_cached_mistral(default_server, openai_schema):
    url, key = default_server.url, default_server.key
    check_reply(run_example(OPENAI_STYLE, url, key), V3_MODEL_ID, openai_schema)
    check_reply(run_example(OXEN_STYLE, url, key), "open-mistral-7b", openai_schema)
    check_stream(run_example(OXEN_STYLE_STREAM, url, key), "open-mistral-7b", openai_schema)
    assert ast.literal_eval(run_example(OXEN_MODEL, url, key).strip())["id"] == "open-mistral-7b"
