"""Constrained decoding on tiny RANDOM-weight models: only the grammar can make their output valid.

Two tokenizers: the demo model's (Hugging Face, byte-level BPE, a model vocabulary padded past the
tokenizer's) and mistral-common's v3 (SentencePiece with byte fallback and control tokens).
"""

from pathlib import Path
import json
import re
import shutil

import jsonschema
import mistral_common
import pytest

from mistral_serve.engine.builder import load_engine, prepare_model
from mistral_serve.engine.engine import EngineConfig, LLMEngine
from mistral_serve.engine.params import GuidedDecoding, SamplingParams
from mistral_serve.tokenizer import load_tokenizer
from tests.checkpoints import tiny_mistral_config, write_hf_checkpoint
from tests.model.helpers import mistral_config, reference_and_ours

V3_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
NUM_PADDING_IDS = 64  # the HF model's vocabulary is larger than its tokenizer's

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 12},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": -5, "maximum": 99}},
                 "required": ["w"]},
    },
    "required": ["color", "count", "tags", "size"],
}
REGEX = r"(yes|no|maybe) [0-9]{2}!"


def config(**overrides) -> EngineConfig:
    return EngineConfig(**{"block_size": 16, "num_kv_blocks": 64, "max_num_seqs": 16, **overrides})


@pytest.fixture(scope="module", params=["hf", "mistral-v3"])
def engine(request, tmp_path_factory):
    if request.param == "hf":
        tokenizer = load_tokenizer(request.getfixturevalue("demo_path"))
        model = reference_and_ours(mistral_config(vocab_size=tokenizer.vocab_size + NUM_PADDING_IDS))[1]
        return LLMEngine(prepare_model(model), tokenizer, config())
    path, _ = write_hf_checkpoint(tmp_path_factory.mktemp("v3"), tiny_mistral_config(vocab_size=32768))
    shutil.copy(V3_TOKENIZER, path / "tokenizer.model.v3")
    return load_engine(str(path), config=config())


def prompt(engine, text="Answer in JSON:"):
    return engine.tokenizer.encode(text)


def run(engine, requests):
    """{request_id: [(text, token ids, finish reason) per choice]}; every block is free at the end."""
    for request_id, prompt_ids, params in requests:
        engine.add_request(request_id, prompt_ids, params)
    outputs = {request_id: {} for request_id, _, _ in requests}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            text, tokens, _ = outputs[delta.request_id].get(delta.index, ("", (), None))
            outputs[delta.request_id][delta.index] = (text + delta.text, tokens + delta.token_ids,
                                                      delta.finish_reason)
    assert engine.num_kv_blocks_used == 0
    assert not engine.runner.matchers  # every matcher freed
    return {request_id: [choices[i] for i in sorted(choices)] for request_id, choices in outputs.items()}


def texts(engine, guided, *, seeds=(0, 1), n=2, max_tokens=60, **params):
    requests = [(f"s{seed}", prompt(engine), SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=max_tokens,
                                                           guided=guided, **params)) for seed in seeds]
    choices = [choice for outputs in run(engine, requests).values() for choice in outputs]
    assert [reason for _, _, reason in choices] == ["stop"] * len(choices), choices
    return [text for text, _, _ in choices]


def test_json_schema_outputs_validate(engine):
    outputs = texts(engine, GuidedDecoding.json_schema(SCHEMA))
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(outputs)) > 1  # temperature 1 with several seeds: not one fixed answer


def test_json_object_outputs_are_one_object_and_never_special_or_padding_tokens(engine):
    tokenizer, vocab = engine.tokenizer, engine.tokenizer.grammar_vocab()
    # closers made likely so a random model finishes; specials and padding made very likely, so
    # only the mask keeps them out
    bias = {i: {b'"': 12.0, b"}": 4.0, b"]": 4.0}[piece] for i, piece in enumerate(vocab) if piece in (b'"', b"}", b"]")}
    tempting = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)
                and i not in tokenizer.eos_token_ids][:5]
    tempting += range(tokenizer.vocab_size, engine.model.config.vocab_size)[:5]  # padding, if any
    bias.update({i: 100.0 for i in tempting})
    outputs = texts(engine, GuidedDecoding("json_object"), max_tokens=80, logit_bias=bias)
    for text in outputs:
        assert isinstance(json.loads(text), dict), text
    assert any(json.loads(text) for text in outputs)  # not only {}


def test_regex_output_fullmatches(engine):
    for text in texts(engine, GuidedDecoding("regex", REGEX), max_tokens=20):
        assert re.fullmatch(REGEX, text), text


def test_unconstrained_requests_give_the_same_tokens_beside_constrained_ones(engine):
    plain = [("greedy", prompt(engine, "Hello"), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
             ("seeded", prompt(engine, "Hi there"), SamplingParams(temperature=1.0, seed=3, max_tokens=12,
                                                                   ignore_eos=True))]
    alone = run(engine, plain)
    constrained = [(f"c{i}", prompt(engine), SamplingParams(temperature=1.0, seed=i, max_tokens=60,
                                                            guided=GuidedDecoding.json_schema(SCHEMA)))
                   for i in range(2)]
    mixed = run(engine, constrained + plain)
    assert {k: mixed[k] for k in alone} == alone
    for request_id, _, _ in constrained:
        jsonschema.validate(json.loads(mixed[request_id][0][0]), SCHEMA)


def test_preemption_and_recompute_do_not_feed_the_grammar_twice(engine):
    guided = GuidedDecoding.json_schema(SCHEMA)
    requests = [(f"r{i}", prompt(engine, f"Request {i}:"), SamplingParams(temperature=0, max_tokens=60,
                                                                         logit_bias={i: 1.0}, guided=guided))
                for i in range(4)]
    expected = run(engine, requests)
    tight = LLMEngine(engine.prepared, engine.tokenizer, config(block_size=4, num_kv_blocks=16,
                                                             max_num_batched_tokens=16))
    assert run(tight, requests) == expected
    assert tight.scheduler.num_preemptions > 0


def test_a_schema_is_compiled_once_for_requests_that_share_it(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    before = engine.grammars.num_compilations
    spaced = GuidedDecoding("json_schema", json.dumps(schema, indent=4))  # the same schema, other whitespace
    compact = GuidedDecoding.json_schema(schema)
    requests = [("a", prompt(engine), SamplingParams(temperature=0, max_tokens=20, guided=compact)),
                ("b", prompt(engine), SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=20, guided=spaced))]
    for outputs in run(engine, requests).values():
        for text, _, reason in outputs:
            assert reason == "stop" and json.loads(text)["ok"] in (True, False)
    assert engine.grammars.num_compilations == before + 1


@pytest.mark.parametrize("guided, message", [
    (GuidedDecoding.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
    (GuidedDecoding.json_schema({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "'not'"),
    (GuidedDecoding.json_schema({"type": "object", "properties": {"a": {"type": "widget"}}}), "widget"),
    (GuidedDecoding("regex", "(unclosed"), "regex"),
    (GuidedDecoding("ebnf", 'root ::= missing_rule'), "missing_rule"),
])
def test_a_grammar_the_engine_cannot_honour_fails_at_validate(engine, guided, message):
    params = SamplingParams(max_tokens=5, guided=guided)
    for _ in range(2):  # a failure is remembered, and still fails
        with pytest.raises(ValueError, match=message):
            engine.validate(prompt(engine), params)
    assert not engine.has_unfinished_requests()


def test_a_property_named_like_an_unsupported_keyword_is_fine(engine):
    schema = {"type": "object", "properties": {"not": {"enum": [1]}}, "required": ["not"]}
    [text] = texts(engine, GuidedDecoding.json_schema(schema), seeds=(0,), n=1, max_tokens=20)
    assert json.loads(text) == {"not": 1}


def test_ignore_eos_still_ends_where_the_grammar_ends(engine):
    [text] = texts(engine, GuidedDecoding("regex", "ok"), seeds=(0,), n=1, max_tokens=20, ignore_eos=True)
    assert text == "ok"


def test_max_tokens_cuts_a_constrained_output_with_length(engine):
    outputs = run(engine, [("r", prompt(engine), SamplingParams(temperature=0, max_tokens=3,
                                                               guided=GuidedDecoding.json_schema(SCHEMA)))])
    text, tokens, reason = outputs["r"][0]
    assert reason == "length" and len(tokens) == 3
    assert text.startswith('{"')  # an incomplete prefix of a valid output


def test_guided_specs_are_checked_when_built():
    with pytest.raises(ValueError, match="not valid JSON"):
        GuidedDecoding("json_schema", "{")
    with pytest.raises(ValueError, match="kind"):
        GuidedDecoding("yaml", "x")
    assert GuidedDecoding("json_schema", '{ "type" : "object" }') == GuidedDecoding.json_schema({"type": "object"})
    assert hash(GuidedDecoding("regex", "a")) == hash(GuidedDecoding("regex", "a"))
