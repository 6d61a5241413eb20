"""The bounds a grammar's spec must keep: each refusal names its bound; a spec at the bound passes."""

import pytest

from mistral_serve.engine.client import GrammarTooLargeError, GuidedDecodingError
from mistral_serve.engine.grammar_bounds import (
    MAX_GRAMMAR_CHARS, MAX_REGEX_CHARS, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_ENUM_ENTRIES,
    MAX_SCHEMA_PROPERTIES, check_grammar_bounds,
)
from mistral_serve.engine.params import GuidedDecoding
from tests.engine.helpers import nested, object_with


def spread_enums(num_values: int) -> dict:
    """`num_values` enum values and consts, spread over several properties: the bound is on them all."""
    return {"type": "object", "properties": {
        "a": {"enum": list(range(num_values // 2))},
        "b": {"anyOf": [{"const": i} for i in range(num_values - num_values // 2)]}}}


def padded_schema(num_bytes: int) -> dict:
    schema = {"type": "string", "description": ""}
    padding = num_bytes - len(GuidedDecoding.json_schema(schema).spec.encode())
    return {**schema, "description": "x" * padding}


@pytest.mark.parametrize("over, at, bound", [
    (object_with(MAX_SCHEMA_PROPERTIES + 1), object_with(MAX_SCHEMA_PROPERTIES), "max_schema_properties"),
    ({"type": "object", "properties": {"x": object_with(MAX_SCHEMA_PROPERTIES // 2),
                                       "y": object_with(MAX_SCHEMA_PROPERTIES // 2 + 1)}},
     {"type": "object", "properties": {"x": object_with(MAX_SCHEMA_PROPERTIES // 2),
                                       "y": object_with(MAX_SCHEMA_PROPERTIES // 2 - 2)}},
     "max_schema_properties"),
    (spread_enums(MAX_SCHEMA_ENUM_ENTRIES + 1), spread_enums(MAX_SCHEMA_ENUM_ENTRIES), "max_schema_enum_entries"),
    (nested(MAX_SCHEMA_DEPTH + 1), nested(MAX_SCHEMA_DEPTH), "max_schema_depth"),
    (padded_schema(MAX_SCHEMA_BYTES + 1), padded_schema(MAX_SCHEMA_BYTES), "max_schema_bytes"),
])
def test_a_schema_past_a_bound_is_refused_naming_it_and_one_at_the_bound_passes(over, at, bound):
    with pytest.raises(GrammarTooLargeError, match=bound) as refusal:
        check_grammar_bounds(GuidedDecoding.json_schema(over))
    assert refusal.value.code == "grammar_too_large"
    check_grammar_bounds(GuidedDecoding.json_schema(at))


@pytest.mark.parametrize("kind, limit, bound", [
    ("regex", MAX_REGEX_CHARS, "max_regex_chars"),
    ("ebnf", MAX_GRAMMAR_CHARS, "max_grammar_chars"),
])
def test_regexes_and_grammars_are_bounded_in_length(kind, limit, bound):
    with pytest.raises(GrammarTooLargeError, match=bound):
        check_grammar_bounds(GuidedDecoding(kind, "a" * (limit + 1)))
    check_grammar_bounds(GuidedDecoding(kind, "a" * limit))


def test_a_refusal_is_a_guided_decoding_error_and_a_boolean_schema_has_nothing_to_bound():
    assert issubclass(GrammarTooLargeError, GuidedDecodingError)
    check_grammar_bounds(GuidedDecoding.json_schema(True))
    check_grammar_bounds(GuidedDecoding("json_object"))
